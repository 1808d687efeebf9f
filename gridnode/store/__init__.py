"""Object stores: the `file:` folder (embedded default) and S3 buckets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from gridnode.errors import ConfigError


@dataclass(frozen=True)
class StoreURL:
    scheme: str  # "file" or "s3"
    path: str = ""  # file: the folder
    bucket: str = ""  # s3: the bucket
    prefix: str = ""  # s3: a key prefix inside the bucket, "" or ending in "/"


def parse_store_url(url: str) -> StoreURL:
    """``file:PATH``, ``file:///abs/path`` or ``s3://BUCKET[/PREFIX]``."""
    if url.startswith("file:"):
        rest = url[len("file:"):]
        if rest.startswith("//"):
            rest = urlsplit(url).path
        if not rest:
            raise ConfigError("store: 'file:' needs a folder, e.g. file:gridnode-data")
        return StoreURL("file", path=rest)
    if url.startswith("s3://"):
        parts = urlsplit(url)
        if not parts.netloc:
            raise ConfigError("store: 's3://' needs a bucket, e.g. s3://my-bucket/grid")
        prefix = parts.path.strip("/")
        return StoreURL("s3", bucket=parts.netloc, prefix=prefix + "/" if prefix else "")
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ConfigError(
        f"store: unknown scheme in {url!r} ({scheme!r}); use file:PATH or s3://BUCKET/PREFIX"
    )


def open_backend(url: str, *, s3_endpoint: str | None = None, s3_region: str | None = None,
                 read_only: bool = False, on_throttled: Callable[[str], None] | None = None) -> Backend:
    """The blocking backend a store URL names (boto3 is imported only for s3://); ``read_only``: a
    file: store creates nothing (S3 creates nothing anyway); ``on_throttled(operation)``: S3 asked
    to slow down (each try)."""
    parsed = parse_store_url(url)
    if parsed.scheme == "file":
        from gridnode.store.file import FileBackend

        return FileBackend(parsed.path, read_only=read_only)
    from gridnode.store.s3 import S3Backend

    return S3Backend(parsed.bucket, prefix=parsed.prefix, endpoint_url=s3_endpoint, region=s3_region,
                     on_throttled=on_throttled)


from gridnode.store.base import Backend, ObjectStore  # noqa: E402 - after the light helpers

__all__ = ["Backend", "ObjectStore", "StoreURL", "open_backend", "parse_store_url"]
