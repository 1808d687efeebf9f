"""
Shared pytest fixtures. The media clips (``media_clips``, ``long_clip``) and ``real_reactor``
fixture live in tests/media_samples.py; they are exported here so any test
module can ask for them.
"""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.media_samples import long_clip, media_clips, real_reactor

__all__ = ["long_clip", "media_clips", "open_folder", "real_reactor"]


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user may traverse (pytest's own tmp folders are root-only): for nodes whose
    ffmpeg runs as an unprivileged user."""
    folder = Path(tempfile.mkdtemp(prefix="gridnode-open-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
