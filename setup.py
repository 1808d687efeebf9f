from setuptools import find_packages, setup

setup(
    name="gridnode",
    version="0.1.0",
    description="A self-hosted video conversion farm: identical nodes, S3, ffmpeg, no central server",
    python_requires=">=3.11",
    # twisted/plugins has no __init__.py (and there is no twisted/__init__.py): list it by hand.
    packages=find_packages(include=["gridnode", "gridnode.*"]) + ["twisted.plugins"],
    entry_points={"console_scripts": ["gridnode = gridnode.client.cli:main"]},
    package_data={"gridnode.web": ["openapi.yaml", "static/*", "static/**/*"], "twisted.plugins": ["gridnode_plugin.py"]},
    install_requires=[
        # [tls]: pyOpenSSL and service_identity, for ssl: endpoints and https nodes
        "twisted[tls]>=24.7",
        "treq>=24.9",
        "boto3>=1.35",
        "prometheus-client>=0.20",
        "tqdm>=4.66",
        "PyJWT>=2.8",
        "multipart>=1.2",
        # Standard Webhooks signatures: what receivers verify with signs ours (gridnode/notify/)
        "standardwebhooks>=1.1",
    ],
)
