"""gridnode: a self-hosted video conversion farm of identical nodes."""

__version__ = "0.1.0"
