"""
The browser libraries under gridnode/web/static/vendor/ are the npm registry's files, unmodified:
each one's sha256 is the one its README records, and each has its license beside it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "gridnode" / "web" / "static" / "vendor"


def recorded() -> dict[str, str]:
    text = (VENDOR / "README.md").read_text()
    return dict(re.findall(r"`([\w.-]+\.js)`: sha256 `([0-9a-f]{64})`", text))


class VendorTests:
    def test_every_script_is_the_one_recorded(self) -> None:
        sums = recorded()
        scripts = sorted(p.name for p in VENDOR.glob("*.js"))
        assert scripts and sorted(sums) == scripts
        for name, digest in sums.items():
            assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name

    def test_every_license_named_in_the_readme_is_there(self) -> None:
        text = (VENDOR / "README.md").read_text()
        named = set(re.findall(r"see `([\w.-]*LICENSE)`", text))
        assert len(named) == len(recorded())
        for name in named:
            assert (VENDOR / name).read_text().strip(), name
