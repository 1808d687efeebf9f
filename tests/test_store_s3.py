"""The S3 backend against a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gridnode.errors import ConfigError, GridnodeError, NotFound, PreconditionFailed, StorageUnavailable
from gridnode.store import open_backend
from gridnode.store.s3 import MULTIPART_THRESHOLD, PART_SIZE, S3Backend
from tests.helpers import closed_port
from tests.store_contract import StoreContract

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.s3server"]


class S3StoreTests(StoreContract):
    @pytest.fixture
    def backend(self, s3_endpoint: str, s3_bucket: str) -> Iterator[S3Backend]:
        b = S3Backend(s3_bucket, endpoint_url=s3_endpoint)
        yield b
        b.close()

    def test_multipart_put_file_round_trips(self, backend: S3Backend, tmp_path: Path) -> None:
        """A file above the multipart threshold goes up in parts (ETag '<md5>-N') and comes back whole."""
        payload = os.urandom(MULTIPART_THRESHOLD + 4 * 1024 * 1024 + 5)
        src = tmp_path / "big.bin"
        src.write_bytes(payload)
        info = backend.put_file("outputs/J/big.mp4", str(src))
        assert info.size == len(payload)
        parts = -(-len(payload) // PART_SIZE)
        assert parts > 1 and info.etag.endswith(f"-{parts}") and info.etag != hashlib.md5(payload).hexdigest()
        assert backend.stat("outputs/J/big.mp4").etag == info.etag
        dst = tmp_path / "out" / "big.mp4"
        dst.parent.mkdir()
        assert backend.get_file("outputs/J/big.mp4", str(dst)).etag == info.etag
        assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(payload).digest()
        assert os.listdir(dst.parent) == ["big.mp4"]

    def test_conditional_put_file_is_one_request(self, backend: S3Backend, tmp_path: Path) -> None:
        """A conditional put_file above the threshold is a single PutObject: MD5 ETag, and 412 on a rerun."""
        payload = os.urandom(MULTIPART_THRESHOLD + 1)
        src = tmp_path / "big.bin"
        src.write_bytes(payload)
        info = backend.put_file("inputs/J/source", str(src), if_none_match="*")
        assert info.etag == hashlib.md5(payload).hexdigest()
        with pytest.raises(PreconditionFailed):
            backend.put_file("inputs/J/source", str(src), if_none_match="*")

    def test_etag_has_no_quotes_and_quoted_if_match_works(self, backend: S3Backend) -> None:
        """ETags come back bare; an ETag given with its quotes still matches."""
        info = backend.put_bytes("jobs/q.json", b"1")
        assert '"' not in info.etag and '"' not in backend.list("jobs/").items[0].etag
        backend.put_bytes("jobs/q.json", b"2", if_match=f'"{info.etag}"')

    def test_conditional_delete_of_missing_key(self, backend: S3Backend) -> None:
        """delete(if_match) of a key that is not there is NotFound, as S3 answers 404."""
        with pytest.raises(NotFound):
            backend.delete("jobs/gone.json", if_match="0" * 32)

    def test_presigned_url_serves_the_bytes(self, backend: S3Backend) -> None:
        """A presigned GET URL fetched with a plain HTTP client returns the object."""
        backend.put_bytes("outputs/J/poster.jpg", b"\xff\xd8jpeg bytes")
        url = backend.presigned_url("outputs/J/poster.jpg", expires=60)
        assert url is not None and "X-Amz-Signature=" in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == b"\xff\xd8jpeg bytes"

    def test_no_local_path(self, backend: S3Backend) -> None:
        """Objects in a bucket have no local file."""
        backend.put_bytes("jobs/l.json", b"x")
        assert backend.local_path("jobs/l.json") is None

    def test_get_file_missing_leaves_no_file(self, backend: S3Backend, tmp_path: Path) -> None:
        """A failed download leaves neither the target nor a temporary file."""
        with pytest.raises(NotFound):
            backend.get_file("jobs/none.json", str(tmp_path / "x"))
        assert os.listdir(tmp_path) == []

    def test_url(self, backend: S3Backend) -> None:
        """The store's URL is s3://bucket/prefix."""
        assert backend.url == f"s3://{backend.bucket}/"


class S3PrefixStoreTests(StoreContract):
    """The whole contract again, inside a prefix of a bucket shared with other data."""

    @pytest.fixture
    def backend(self, s3_endpoint: str, s3_bucket: str, s3_client: Any) -> Iterator[S3Backend]:
        s3_client.put_object(Bucket=s3_bucket, Key="other/jobs/a.json", Body=b"not ours")
        b = S3Backend(s3_bucket, prefix="grid/dev/", endpoint_url=s3_endpoint)
        yield b
        b.close()

    def test_keys_live_under_the_prefix(self, backend: S3Backend, s3_client: Any) -> None:
        """Objects are stored at prefix+key, and listed with the prefix stripped."""
        backend.put_bytes("jobs/p.json", b"x")
        raw = s3_client.list_objects_v2(Bucket=backend.bucket)
        assert sorted(o["Key"] for o in raw["Contents"]) == ["grid/dev/jobs/p.json", "other/jobs/a.json"]
        assert [i.key for i in backend.list("").items] == ["jobs/p.json"]
        assert backend.url == f"s3://{backend.bucket}/grid/dev/"

    def test_prefix_isolation(self, backend: S3Backend, s3_endpoint: str) -> None:
        """Two prefixes in one bucket neither see nor touch each other's objects."""
        other = S3Backend(backend.bucket, prefix="grid/prod/", endpoint_url=s3_endpoint)
        try:
            backend.put_bytes("jobs/same.json", b"dev")
            other.put_bytes("jobs/same.json", b"prod")
            assert backend.get_bytes("jobs/same.json")[0] == b"dev"
            assert [i.key for i in other.list("").items] == ["jobs/same.json"]
            other.delete("jobs/same.json")
            assert backend.get_bytes("jobs/same.json")[0] == b"dev"
            with pytest.raises(NotFound):
                other.stat("jobs/same.json")
        finally:
            other.close()

    def test_presigned_url_names_the_prefixed_key(self, backend: S3Backend) -> None:
        """A presigned URL fetches the object under the prefix."""
        backend.put_bytes("outputs/J/a.txt", b"hello")
        url = backend.presigned_url("outputs/J/a.txt")
        assert url is not None and "/grid/dev/outputs/J/a.txt?" in url
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.read() == b"hello"


class S3FailureTests:
    def test_unreachable_endpoint_is_unavailable_quickly(self, s3_endpoint: str) -> None:
        """A closed loopback port gives StorageUnavailable naming the endpoint, after bounded retries."""
        endpoint = f"http://127.0.0.1:{closed_port()}"
        backend = S3Backend("b", endpoint_url=endpoint)
        start = time.monotonic()
        with pytest.raises(StorageUnavailable) as e:
            backend.put_bytes("jobs/x.json", b"x")
        assert time.monotonic() - start < 10
        assert endpoint in e.value.message and "s3://b/" in e.value.message
        assert "--s3-endpoint" in e.value.message
        backend.close()

    def test_server_errors_are_retried_then_unavailable(self, s3_endpoint: str) -> None:
        """A server that keeps answering 503 SlowDown is retried max_attempts times, then StorageUnavailable."""
        hits: list[str] = []

        class Busy(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            backend = S3Backend("b", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}", max_attempts=2)
            with pytest.raises(StorageUnavailable) as e:
                backend.put_bytes("jobs/x.json", b"x")
            assert len(hits) == 2 and "SlowDown" in e.value.message
            backend.close()
        finally:
            server.shutdown()
            server.server_close()

    def test_slowdown_is_retried_with_backoff_and_counted(self, s3_endpoint: str) -> None:
        """A server that answers 503 SlowDown twice, then takes the write: botocore's retries (with
        their jittered backoff) carry the put through, and each throttled answer is counted."""
        hits: list[str] = []

        class SlowThenOk(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's name
                hits.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                slow = len(hits) <= 2
                body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503 if slow else 200)
                if not slow:
                    body = b""
                    self.send_header("ETag", '"9a0364b9e99bb480dd25e1f0284c8555"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), SlowThenOk)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        throttled: list[str] = []
        try:
            backend = S3Backend("b", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
                                on_throttled=throttled.append)
            info = backend.put_bytes("jobs/x.json", b"content")
            assert info.etag == "9a0364b9e99bb480dd25e1f0284c8555"
            assert len(hits) == 3 and throttled == ["PutObject", "PutObject"]
            backend.close()
        finally:
            server.shutdown()
            server.server_close()

    def test_transport_defaults(self, s3_endpoint: str) -> None:
        """By default: botocore's standard retry mode, 4 tries in all, short connect and read timeouts."""
        backend = S3Backend("b", endpoint_url=s3_endpoint)
        config = backend._client.meta.config
        assert config.retries == {"mode": "standard", "total_max_attempts": 4}
        assert config.connect_timeout <= 5 and config.read_timeout <= 60
        backend.close()

    def test_missing_bucket_names_it(self, s3_endpoint: str) -> None:
        """A bucket that does not exist is StorageUnavailable with the bucket's name."""
        backend = S3Backend("no-such-bucket-here", endpoint_url=s3_endpoint)
        with pytest.raises(StorageUnavailable) as e:
            backend.put_bytes("jobs/x.json", b"x")
        assert "no-such-bucket-here" in e.value.message and "does not exist" in e.value.message
        with pytest.raises(StorageUnavailable):
            backend.list("jobs/")
        with pytest.raises(StorageUnavailable) as e:
            backend.check()
        assert "no-such-bucket-here" in e.value.message
        backend.close()

    def test_check_passes_on_a_bucket(self, s3_endpoint: str, s3_bucket: str) -> None:
        """check() is quiet when the bucket exists and answers."""
        backend = S3Backend(s3_bucket, endpoint_url=s3_endpoint)
        backend.check()
        backend.close()

    def test_unknown_errors_keep_their_type(self, s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> None:
        """A local failure (a missing source file) is not disguised as a storage error."""
        backend = S3Backend(s3_bucket, endpoint_url=s3_endpoint)
        with pytest.raises(FileNotFoundError):
            backend.put_file("jobs/x.json", str(tmp_path / "absent"))
        backend.close()

    def test_bad_prefix_is_a_config_error(self) -> None:
        """A prefix without its trailing slash, or with unsafe characters, is refused at construction."""
        with pytest.raises(ConfigError):
            S3Backend("b", prefix="grid")
        with pytest.raises(ConfigError):
            S3Backend("b", prefix="../x/")

    def test_if_none_match_only_star(self, s3_endpoint: str, s3_bucket: str) -> None:
        """if_none_match with anything but '*' is refused before any request, as in the other stores."""
        backend = S3Backend(s3_bucket, endpoint_url=s3_endpoint)
        with pytest.raises(GridnodeError) as e:
            backend.put_bytes("jobs/x.json", b"x", if_none_match="abc")
        assert e.value.code == "bad_request"
        backend.close()

    def test_open_backend_builds_s3(self, s3_endpoint: str, s3_bucket: str) -> None:
        """--store s3://BUCKET/PREFIX with --s3-endpoint opens this backend on that prefix."""
        backend = open_backend(f"s3://{s3_bucket}/grid", s3_endpoint=s3_endpoint)
        try:
            assert isinstance(backend, S3Backend) and backend.prefix == "grid/"
            backend.put_bytes("jobs/o.json", b"x")
            assert backend.stat("jobs/o.json").size == 1
        finally:
            backend.close()
