"""
Shared pytest fixtures. The media clips (``media_clips``) and ``real_reactor``
fixture live in tests/media_samples.py; they are exported here so any test
module can ask for them.
"""

from tests.media_samples import media_clips, real_reactor

__all__ = ["media_clips", "real_reactor"]
