"""
``gridnode lifecycle``: the S3 lifecycle rules of a pool's bucket, printed (and with ``--apply``
set), so S3 expires by itself what the nodes' retention sweep (gridnode/retention.py) would.

The rules are built from gridnode/keys.py's prefixes under the store's own prefix; with no
retention they are deploy/s3/lifecycle.json for ``s3://acme-video/grid`` (a test keeps the two
equal). S3 counts an object's days from its creation, the sweep from the job's end, and S3
cannot tell a finished job from a running one: an input is expired ``--retain-inputs`` days
after its upload, whatever its job's state; and it takes whole days, 1 at least.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gridnode import keys
from gridnode.errors import ConfigError, GridnodeError
from gridnode.store import parse_store_url

#: every rule this command makes has an ID that starts so: ``--apply`` replaces those, keeps others
RULE_PREFIX = "gridnode-"
#: days a purged job's tombstone answers ``404 gone``
TOMBSTONE_DAYS = 30
#: days a chunk's record and archive are kept at most (a chunked job runs hours, not days)
CHUNK_DAYS = 7


def _expire(rule_id: str, prefix: str, days: int) -> dict[str, Any]:
    return {"ID": RULE_PREFIX + rule_id, "Filter": {"Prefix": prefix}, "Status": "Enabled",
            "Expiration": {"Days": max(1, days)}}


def rules(store_prefix: str, retain_inputs: int | None = None, retain_outputs: int | None = None
          ) -> dict[str, Any]:
    """The lifecycle configuration of a store under ``store_prefix`` ("" or ending in "/")."""
    made: list[dict[str, Any]] = [
        {"ID": RULE_PREFIX + "abort-incomplete-multipart", "Filter": {"Prefix": store_prefix}, "Status": "Enabled",
         "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}},
        _expire("idempotency-entries", store_prefix + keys.idempotency_prefix(), 2),
        _expire("abandoned-tus-uploads", store_prefix + keys.uploads_root(), 7),
        _expire("purged-job-tombstones", store_prefix + keys.tombstones_prefix(), TOMBSTONE_DAYS),
        # a chunked job's owner deletes them at its end: the rule is the backstop for one whose
        # owners all died, or a pool that stopped
        _expire("chunk-leftovers", store_prefix + keys.chunks_root(), CHUNK_DAYS),
    ]
    if retain_inputs is not None:
        made.append(_expire("retain-inputs", store_prefix + keys.inputs_prefix(), retain_inputs))
    if retain_outputs is not None:
        made.append(_expire("retain-outputs", store_prefix + keys.outputs_root(), retain_outputs))
    return {"Rules": made}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, metavar="URL", help="the pool's store: s3://BUCKET/PREFIX")
    p.add_argument("--retain-inputs", type=days, metavar="DAYS", help="as the nodes' --retain-inputs")
    p.add_argument("--retain-outputs", type=days, metavar="DAYS", help="as the nodes' --retain-outputs")
    p.add_argument("--apply", action="store_true",
                   help="set them on the bucket: its rules whose ID starts with gridnode- are replaced, others kept")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint URL, for S3-compatible servers")
    p.add_argument("--s3-region", metavar="NAME", help="S3 region")


def days(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 36500:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of days from 0 to 36500")
    return int(text)


def run(args: argparse.Namespace, client: Any = None) -> int:
    """Print the rules (``--apply``: and set them); 1 with one coded line on stderr on failure."""
    try:
        where = parse_store_url(args.store)
        if where.scheme != "s3":
            raise ConfigError("lifecycle rules are S3's: give --store s3://BUCKET/PREFIX (on a file: store, the "
                              "nodes' retention sweep deletes by itself)")
        config = rules(where.prefix, args.retain_inputs, args.retain_outputs)
        for what, value in (("inputs", args.retain_inputs), ("outputs", args.retain_outputs)):
            if value is not None and value < 7:
                print(f"note: S3 expires {what} {max(1, value)} day(s) after they were written, whether their job "
                      "ended or not: a job unfinished that long loses them", file=sys.stderr)
        print(json.dumps(config, indent=2))
        if args.apply:
            apply(where.bucket, config, client or _client(args))
            print(f"set on bucket {where.bucket}", file=sys.stderr)
    except GridnodeError as e:
        print(f"gridnode: {e.code}: {e.message}", file=sys.stderr)
        return 1
    return 0


def apply(bucket: str, config: dict[str, Any], client: Any) -> None:
    """Set ``config`` on ``bucket``, keeping the bucket's rules that are not gridnode's."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        try:
            current = client.get_bucket_lifecycle_configuration(Bucket=bucket).get("Rules", [])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
                raise
            current = []
        kept = [r for r in current if not str(r.get("ID", "")).startswith(RULE_PREFIX)]
        client.put_bucket_lifecycle_configuration(Bucket=bucket,
                                                  LifecycleConfiguration={"Rules": kept + config["Rules"]})
    except ClientError as e:
        error = e.response.get("Error", {})
        raise GridnodeError(f"S3 refused the rules: {error.get('Code')}: {error.get('Message')}",
                            code="storage_error", status=502) from None
    except BotoCoreError as e:
        raise GridnodeError(f"cannot reach S3: {e}", code="storage_unavailable", status=503) from None


def _client(args: argparse.Namespace) -> Any:
    import boto3

    session = boto3.session.Session()
    region = args.s3_region or session.region_name or ("us-east-1" if args.s3_endpoint else None)
    return session.client("s3", endpoint_url=args.s3_endpoint, region_name=region)
