"""
An S3 bucket (``s3://BUCKET/PREFIX``), or any S3-compatible server
(``--s3-endpoint``), as a blocking `Backend`.

boto3 is imported only when an `S3Backend` is made, so nothing the twistd
plugin loads pulls it in. Credentials come from the standard AWS chain
(environment, shared files, instance role). What this module adds to boto3:

- keys are checked by `gridnode.keys` and live under ``prefix``;
- small and conditional writes are one PutObject (``If-None-Match`` /
  ``If-Match`` are enforced by S3 itself, so racing nodes cannot both win);
  large unconditional files go through boto3's transfer manager in parallel
  parts, and large reads are parallel ranged GETs pinned to one ETag;
- transport retries are botocore's (standard mode: exponential backoff with
  full jitter on 5xx, throttling and connection errors, a throttled try
  waiting rand(0, 1) x 2^i s), with short timeouts; each throttled answer
  (``503 SlowDown``) is counted (``on_throttled``). Not adaptive mode: its
  limiter sleeps in the store's threads, where a lease renewal would queue
  behind it; the node's own budget (gridnode/store/rate.py) paces requests;
- a body still arriving is streamed in as a multipart upload, ``part_size``
  parts read from its file by offset (gridnode/store/streamed.py drives it;
  tusd's S3 store does the same);
- every botocore failure becomes a `GridnodeError` that names the bucket and
  says what to check.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from gridnode import keys
from gridnode.errors import ConfigError, GridnodeError, InvalidKey, NotFound, PreconditionFailed, StorageUnavailable
from gridnode.store.base import THREADS, FileWindow, ObjectInfo, Page
from gridnode.store.memory import check_size

MB = 1024 * 1024
#: S3 refuses a single PutObject above 5 GiB.
MAX_SINGLE_PUT = 5 * 1024 * MB

# Transfer tuning (measured with bench/store_upload.py against moto on a
# 2-core box: 8 MiB x 10 beat 16 MiB x 8 and 32 MiB x 8; it is also boto3's
# default). Objects from 16 MiB go in parallel parts; smaller ones are one
# PutObject, so their ETag stays the MD5 of the bytes.
MULTIPART_THRESHOLD = 16 * MB
PART_SIZE = 8 * MB
CONCURRENCY = 10

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchUpload"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
_DENIED = {"403", "AccessDenied", "AllAccessDisabled", "AccountProblem"}
#: what S3 (and botocore's standard retry mode) calls being asked to slow down
THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                       "TooManyRequestsException", "RequestThrottled", "503"})
_CREDENTIALS = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
}


class S3Backend:
    """
    A bucket, or a ``prefix`` (``""`` or ending in ``/``) inside one. Keys
    given and returned are without the prefix.

    ``client`` replaces the boto3 client this would build (tests, custom
    sessions); the others tune the transport and transfers.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        retry_mode: str = "standard",
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        concurrency: int = CONCURRENCY,
        on_throttled: Callable[[str], None] | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ConfigError(f"store: {bucket!r} is not an S3 bucket name")
        if prefix:
            if not prefix.endswith("/"):
                raise ConfigError(f"store: the S3 prefix {prefix!r} must end with '/'")
            try:
                keys.check_key(prefix[:-1])
            except InvalidKey as e:
                raise ConfigError(f"store: the S3 prefix {prefix!r} is not a safe key ({e.message})") from None
        if part_size < 5 * MB or multipart_threshold < part_size:
            raise ConfigError("store: S3 parts are 5 MiB at least, and the threshold no smaller than a part")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{prefix}"
        self._where = f"{self.url} (endpoint {endpoint_url or 'AWS default'})"
        self._multipart_threshold = multipart_threshold
        self._part_size = part_size
        self.part_size: int | None = part_size
        self._concurrency = concurrency
        self._manager: Any = None
        self._manager_lock = threading.Lock()

        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if client is None:
            session = boto3.session.Session()
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": retry_mode, "total_max_attempts": max_attempts},  # tries in all, not retries
                # The transfer manager's parts plus the store's two thread pools (calls, bodies).
                max_pool_connections=concurrency + 2 * THREADS + 4,
                signature_version="s3v4",
                # S3-compatible servers on an address or port want path-style URLs.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = session.client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region or session.region_name or ("us-east-1" if endpoint_url else None),
                config=config,
            )
        self._client = client
        self.on_throttled = on_throttled
        events = getattr(getattr(client, "meta", None), "events", None)
        if events is not None:
            events.register("response-received.s3", self._answered)
        self._transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=part_size,
            max_concurrency=concurrency,
            use_threads=True,
            preferred_transfer_client="classic",
        )

    def _answered(self, event_name: str = "", parsed_response: Any = None, response_dict: Any = None,
                  **_: Any) -> None:
        """Every answer S3 gives (each try of a call): count the throttled ones."""
        if self.on_throttled is None:
            return
        code = str(((parsed_response or {}).get("Error") or {}).get("Code", ""))
        status = (response_dict or {}).get("status_code")
        if code in THROTTLED or status == 503:
            self.on_throttled(event_name.rsplit(".", 1)[-1])

    # -- keys and errors

    def _key(self, key: str) -> str:
        keys.check_key(key)
        full = self.prefix + key
        if len(full.encode("utf-8")) > keys.MAX_KEY_BYTES:
            raise InvalidKey(f"{key} is too long under the prefix {self.prefix}")
        return full

    def _strip(self, full: str) -> str:
        return full[len(self.prefix):]

    @contextlib.contextmanager
    def _errors(self, key: str, what: str) -> Iterator[None]:
        """Turn botocore's and s3transfer's failures into gridnode's errors."""
        try:
            yield
        except GridnodeError:
            raise
        except Exception as e:  # noqa: BLE001 - translated or re-raised below
            translated = self._translate(e, key, what)
            if translated is e:
                raise
            raise translated from e

    def _translate(self, e: BaseException, key: str, what: str) -> BaseException:
        from botocore import exceptions as bx
        from s3transfer.exceptions import RetriesExceededError

        if isinstance(e, RetriesExceededError) and e.last_exception is not None:
            e = e.last_exception
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            detail = f"{code or status} on {what} {key}"
            if code in _NOT_FOUND or (status == 404 and code != "NoSuchBucket"):
                return NotFound(f"no object {key}")
            if code in _PRECONDITION or status == 412:
                return PreconditionFailed(f"{key} has changed or exists already ({detail})")
            if code == "NoSuchBucket":
                return StorageUnavailable(
                    f"the bucket {self.bucket} does not exist at {self._where}: "
                    "create it, or fix --store / --s3-endpoint / --s3-region"
                )
            if code in _CREDENTIALS:
                return StorageUnavailable(
                    f"S3 refused this node's credentials for {self._where} ({detail}): "
                    "check the AWS credentials (environment, profile or instance role) and the clock"
                )
            if code in _DENIED or status == 403:
                return StorageUnavailable(
                    f"access denied to {self._where} ({detail}): the node's credentials need "
                    f"s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on {self.bucket}"
                )
            if code in THROTTLED or status == 503:
                return StorageUnavailable(f"{self._where} asks this node to slow down ({detail}) after retries; "
                                          "the node tries again later (see --store-rate)")
            if status >= 500 or code == "RequestTimeout":
                return StorageUnavailable(f"{self._where} keeps failing ({detail}) after retries; try again later")
            return GridnodeError(f"S3 refused {what} {key} at {self._where}: {detail}", code="storage_error",
                                 status=502)
        if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return StorageUnavailable(
                f"no usable AWS credentials for {self._where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the instance a role"
            )
        if isinstance(e, bx.NoRegionError):
            return StorageUnavailable(f"no AWS region for {self._where}: pass --s3-region or set AWS_REGION")
        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            return StorageUnavailable(
                f"cannot reach the S3 endpoint for {self._where} ({e}): check --s3-endpoint, "
                "the network and DNS, and that the server is running"
            )
        if isinstance(e, (bx.HTTPClientError, bx.ReadTimeoutError, bx.ResponseStreamingError, ConnectionError)):
            return StorageUnavailable(f"the connection to {self._where} failed during {what} {key} ({e}); try again")
        return e

    @staticmethod
    def _etag(value: str | None) -> str:
        return (value or "").strip('"')

    @staticmethod
    def _quoted(etag: str) -> str:
        return '"' + etag.strip('"') + '"'

    @staticmethod
    def _time(value: datetime | None) -> float:
        return value.timestamp() if value is not None else time.time()

    def _conditions(self, if_none_match: str | None, if_match: str | None,
                    content_type: str | None) -> dict[str, str]:
        args: dict[str, str] = {}
        if if_none_match is not None:
            if if_none_match != "*":
                raise GridnodeError("if_none_match takes only '*'", code="bad_request", status=400)
            args["IfNoneMatch"] = "*"
        if if_match is not None:
            args["IfMatch"] = self._quoted(if_match)
        if content_type is not None:
            args["ContentType"] = content_type
        return args

    def _transfers(self) -> Any:
        with self._manager_lock:
            if self._manager is None:
                from boto3.s3.transfer import create_transfer_manager

                self._manager = create_transfer_manager(self._client, self._transfer_config)
            return self._manager

    # -- writes

    def put_bytes(
        self, key: str, data: bytes, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None,
    ) -> ObjectInfo:
        full = self._key(key)
        args = self._conditions(if_none_match, if_match, content_type)
        with self._errors(key, "PutObject"):
            resp = self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data), **args)
        return ObjectInfo(key, len(data), self._etag(resp.get("ETag")), time.time())

    def put_file(
        self, key: str, path: str, *, if_none_match: str | None = None,
        if_match: str | None = None, content_type: str | None = None, handed_over: bool = False,
    ) -> ObjectInfo:
        full = self._key(key)
        args = self._conditions(if_none_match, if_match, content_type)
        size = os.path.getsize(path)
        conditional = if_none_match is not None or if_match is not None
        if conditional or size < self._multipart_threshold:
            # One request: S3 applies the condition atomically, and its ETag is the MD5.
            if size > MAX_SINGLE_PUT:
                raise GridnodeError(
                    f"{key}: a conditional put is one request, and S3 takes at most 5 GiB in one",
                    code="too_large", status=413,
                )
            with open(path, "rb") as body, self._errors(key, "PutObject"):
                resp = self._client.put_object(Bucket=self.bucket, Key=full, Body=body, **args)
            return ObjectInfo(key, size, self._etag(resp.get("ETag")), time.time())
        with self._errors(key, "multipart upload"):
            self._transfers().upload(path, self.bucket, full, extra_args=args).result()
        # The transfer manager keeps CompleteMultipartUpload's answer to itself; a
        # concurrent unconditional writer of the same key could show its ETag here.
        return self.stat(key)

    # -- reads

    def get_bytes(self, key: str, *, max_size: int | None = None) -> tuple[bytes, ObjectInfo]:
        full = self._key(key)
        with self._errors(key, "GetObject"):
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            body = resp["Body"]
            info = ObjectInfo(key, int(resp["ContentLength"]), self._etag(resp.get("ETag")),
                              self._time(resp.get("LastModified")))
            try:
                check_size(key, info.size, max_size)
                return body.read(), info
            finally:
                body.close()

    def get_file(self, key: str, path: str) -> ObjectInfo:
        from s3transfer.subscribers import BaseSubscriber

        class Known(BaseSubscriber):
            """Hands the transfer manager the size and ETag from our HEAD, so every
            ranged GET carries If-Match and a replaced object fails the download."""

            def __init__(self, info: ObjectInfo) -> None:
                self.info = info

            def on_queued(self, future: Any, **kwargs: Any) -> None:
                future.meta.provide_transfer_size(self.info.size)
                future.meta.provide_object_etag(self._quoted())

            def _quoted(self) -> str:
                return '"' + self.info.etag + '"'

        full = self._key(key)
        tmp = f"{path}.{keys.new_id()}.part"
        try:
            for attempt in range(3):
                info = self.stat(key)
                try:
                    with self._errors(key, "download"):
                        self._transfers().download(self.bucket, full, tmp, subscribers=[Known(info)]).result()
                except PreconditionFailed:
                    if attempt == 2:
                        raise
                    continue  # replaced while we read it: read the new version
                os.replace(tmp, path)
                return info
            raise AssertionError("unreachable")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def stat(self, key: str) -> ObjectInfo:
        full = self._key(key)
        with self._errors(key, "HeadObject"):
            resp = self._client.head_object(Bucket=self.bucket, Key=full)
        return ObjectInfo(key, int(resp["ContentLength"]), self._etag(resp.get("ETag")),
                          self._time(resp.get("LastModified")))

    def list(self, prefix: str, *, start_after: str | None = None, limit: int = 1000) -> Page:
        keys.check_prefix(prefix)
        items: list[ObjectInfo] = []
        after = self.prefix + start_after if start_after is not None else None
        truncated = False
        while len(items) < limit:
            args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix,
                                    "MaxKeys": min(1000, limit - len(items))}
            if after is not None:
                args["StartAfter"] = after
            with self._errors(prefix, "ListObjectsV2"):
                resp = self._client.list_objects_v2(**args)
            contents = resp.get("Contents", [])
            for obj in contents:
                items.append(ObjectInfo(self._strip(obj["Key"]), int(obj["Size"]), self._etag(obj.get("ETag")),
                                        self._time(obj.get("LastModified"))))
            truncated = bool(resp.get("IsTruncated")) and bool(contents)
            if not truncated:
                break
            after = contents[-1]["Key"]
        return Page(items, items[-1].key if truncated and items else None)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        full = self._key(key)
        args = {"IfMatch": self._quoted(if_match)} if if_match is not None else {}
        with self._errors(key, "DeleteObject"):
            self._client.delete_object(Bucket=self.bucket, Key=full, **args)

    # -- multipart uploads (a body put as it arrives)

    def begin_upload(self, key: str, *, content_type: str | None = None) -> str:
        full = self._key(key)
        args = {"ContentType": content_type} if content_type is not None else {}
        with self._errors(key, "CreateMultipartUpload"):
            resp = self._client.create_multipart_upload(Bucket=self.bucket, Key=full, **args)
        return str(resp["UploadId"])

    def put_part(self, key: str, upload_id: str, number: int, path: str, offset: int, length: int) -> str:
        full = self._key(key)
        # a window on the file, not its bytes: botocore reads it in small blocks to hash and to
        # send (and rewinds it to retry), so a part costs no memory of its size
        with FileWindow(path, offset, length) as body, self._errors(key, "UploadPart"):
            resp = self._client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                                            Body=body, ContentLength=length)
        return self._etag(resp.get("ETag"))

    def copy_part(self, key: str, upload_id: str, number: int, source: str) -> str:
        full = self._key(key)
        with self._errors(source, "UploadPartCopy"):
            resp = self._client.upload_part_copy(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                                                 CopySource={"Bucket": self.bucket, "Key": self._key(source)})
        return self._etag(resp.get("CopyPartResult", {}).get("ETag"))

    def finish_upload(self, key: str, upload_id: str, parts: builtins.list[tuple[str, int]]) -> ObjectInfo:
        full = self._key(key)
        named = [{"PartNumber": n, "ETag": self._quoted(etag)} for n, (etag, _) in enumerate(parts, start=1)]
        size = sum(length for _, length in parts)
        try:
            with self._errors(key, "CompleteMultipartUpload"):
                resp = self._client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                              MultipartUpload={"Parts": named})
        except NotFound:
            # NoSuchUpload on a retry (the first try timed out on a large object, and completed):
            # the object is there
            info = self.stat(key)
            if info.size != size:
                raise
            return info
        return ObjectInfo(key, size, self._etag(resp.get("ETag")), time.time())

    def abort_upload(self, key: str, upload_id: str) -> None:
        full = self._key(key)
        try:
            with self._errors(key, "AbortMultipartUpload"):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except NotFound:
            pass  # aborted or completed already: nothing is left

    def list_uploads(self, prefix: str) -> builtins.list[tuple[str, str]]:
        keys.check_prefix(prefix)
        found: builtins.list[tuple[str, str]] = []
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        while True:
            with self._errors(prefix, "ListMultipartUploads"):
                resp = self._client.list_multipart_uploads(**args)
            found += [(self._strip(u["Key"]), u["UploadId"]) for u in resp.get("Uploads", [])]
            if not resp.get("IsTruncated"):
                return sorted(found)
            args.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])

    def presigned_url(self, key: str, expires: int = 3600) -> str | None:
        full = self._key(key)
        with self._errors(key, "presigning"):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=int(expires)
            )
        return url

    def local_path(self, key: str) -> str | None:
        return None

    def check(self) -> None:
        """
        Fail now, with a message saying what to fix, if the bucket cannot be
        used (for a node's start-up). HEAD answers carry no error code, so
        this is where a missing bucket reads as one rather than as NotFound.
        """
        from botocore.exceptions import ClientError

        try:
            with self._errors("", "HeadBucket"):
                self._client.head_bucket(Bucket=self.bucket)
        except NotFound as e:
            cause = e.__cause__
            if isinstance(cause, ClientError):
                raise StorageUnavailable(
                    f"the bucket {self.bucket} does not exist at {self._where}: "
                    "create it, or fix --store / --s3-endpoint / --s3-region"
                ) from cause
            raise

    def close(self) -> None:
        with self._manager_lock:
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.shutdown()
        close = getattr(self._client, "close", None)
        if close is not None:
            close()

