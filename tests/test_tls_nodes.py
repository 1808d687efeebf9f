"""
A node on Twisted's TLS endpoint (``--http ssl:PORT:privateKey=KEY:certKey=CERT``) with a
self-signed certificate, as docs/operations.md ("TLS") tells an operator to run one: it serves
the API over https only, advertises an https URL in its record and nodes.json, and converts a clip
for a client that trusts the certificate (urllib, and the gridnode command line through
SSL_CERT_FILE). A client that does not trust it sends nothing.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.helpers import free_port, wait_for
from tests.media_samples import Clips, ffprobe_json, needs_ffmpeg
from tests.nodes import BIN, NodeProcess


class EndpointTests:
    def test_scheme_follows_the_endpoint(self) -> None:
        """An ssl: endpoint is advertised as https, every other kind as http."""
        from gridnode.endpoints import endpoint_scheme

        assert endpoint_scheme("ssl:8443:privateKey=k.pem:certKey=c.pem") == "https"
        assert endpoint_scheme("tcp:8080") == endpoint_scheme("tcp6:8080") == "http"
        assert endpoint_scheme("unix:/run/gridnode.sock") == "http"

    def test_tls_listener_gets_the_backlog(self) -> None:
        """A TLS listener gets the same accept queue as a TCP one, unless it sets its own."""
        from gridnode.endpoints import HTTP_BACKLOG, with_backlog

        assert with_backlog("ssl:8443:privateKey=k.pem") == f"ssl:8443:privateKey=k.pem:backlog={HTTP_BACKLOG}"
        assert with_backlog("ssl:8443:backlog=10:privateKey=k.pem") == "ssl:8443:backlog=10:privateKey=k.pem"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for localhost and 127.0.0.1 (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def fetch(url: str, ca: Path, data: bytes | None = None, method: str = "GET") -> tuple[int, bytes]:
    """A request over https that trusts ``ca`` only."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def jobs_in(store: Path) -> list[str]:
    folder = store / "jobs"
    return sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []


def gridnode(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    plain = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    return subprocess.run([os.path.join(BIN, "gridnode"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={**plain, **env})


@pytest.mark.integration
@needs_ffmpeg
class TLSNodeTests:
    @pytest_twisted.inlineCallbacks
    def test_node_serves_and_converts_over_https(self, tmp_path: Path, media_clips: Clips) -> Any:
        """Over https with the certificate as CA: /health and /metrics answer, a clip is converted
        and its result downloaded; plain http to the same port gets no answer; the node's record and
        nodes.json carry its https URL."""
        key, cert = self_signed(tmp_path)
        store = tmp_path / "store"
        port = free_port()
        node = NodeProcess(tmp_path / "n1", [
            "--store", f"file:{store}", "--node-id", "n1", "--heartbeat", "1", "--queue", "7",
            "--http", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
        node.start()
        try:
            yield node.wait_ready()
            base = f"https://127.0.0.1:{port}"
            # what Prometheus scrapes (deploy/prometheus/ with scheme https): the queue alert's bound
            status, body = fetch(base + "/metrics", cert)
            assert status == 200 and "\ngridnode_queue_capacity 7.0\n" in body.decode()
            status, body = fetch(base + "/health", cert)
            assert status == 200 and json.loads(body)["state"] == "ok"
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()

            listing = store / "registry" / "dev" / "default" / "nodes.json"
            yield wait_for(lambda: listing.exists(), 60)
            assert [n["http_url"] for n in json.loads(listing.read_text())["nodes"]] == [base]
            record = json.loads((store / "registry" / "dev" / "default" / "nodes" / "n1.json").read_text())
            assert record["http_url"] == base

            status, body = fetch(f"{base}/jobs?presets=mp4-480p&name=p.mp4", cert,
                                 media_clips.portrait.read_bytes(), "POST")
            assert status == 201, body
            job_id = json.loads(body)["id"]

            def job() -> Any:
                return json.loads(fetch(f"{base}/jobs/{job_id}", cert)[1])

            yield wait_for(lambda: job()["state"] in ("done", "failed"), timeout=120)
            final = job()
            assert final["state"] == "done", final
            status, data = fetch(base + final["outputs"][0]["url"], cert)
            assert status == 200
            out = tmp_path / "out.mp4"
            out.write_bytes(data)
            assert ffprobe_json(out)["streams"][0]["codec_type"] == "video"
        finally:
            node.stop()

    @pytest_twisted.inlineCallbacks
    def test_command_line_uses_https_nodes(self, tmp_path: Path, media_clips: Clips) -> Any:
        """`gridnode upload --wait --output` finds the node's https URL in nodes.json and converts
        through it when SSL_CERT_FILE names the certificate; without it the client refuses the
        certificate: a coded line, a non-zero exit, and no job made."""
        key, cert = self_signed(tmp_path)
        store = tmp_path / "store"
        port = free_port()
        node = NodeProcess(tmp_path / "n1", [
            "--store", f"file:{store}", "--node-id", "n1", "--heartbeat", "1",
            "--http", f"ssl:{port}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
            "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])
        node.start()
        try:
            yield node.wait_ready()
            listing = store / "registry" / "dev" / "default" / "nodes.json"
            yield wait_for(lambda: listing.exists(), 60)
            work = tmp_path / "client"
            work.mkdir()

            refused = gridnode("upload", str(media_clips.portrait), "--store", f"file:{store}",
                               cwd=work, env={})
            assert refused.returncode != 0
            assert refused.stderr.startswith("gridnode:") and "Failure" not in refused.stderr, refused.stderr
            assert jobs_in(store) == []

            done = gridnode("upload", str(media_clips.portrait), "--store", f"file:{store}", "--preset",
                            "mp4-480p", "--wait", "--output", str(work / "out"), cwd=work,
                            env={"SSL_CERT_FILE": str(cert)})
            assert done.returncode == 0, done.stdout + done.stderr
            # the only address nodes.json gives for n1 is https: the job was sent through it
            assert json.loads(listing.read_text())["nodes"][0]["http_url"] == f"https://127.0.0.1:{port}"
            assert " on n1" in done.stdout, done.stdout
            [result] = list((work / "out").rglob("*.mp4"))
            assert ffprobe_json(result)["streams"][0]["codec_type"] == "video"
            assert len(jobs_in(store)) == 1
        finally:
            node.stop()
