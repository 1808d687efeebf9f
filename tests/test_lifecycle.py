"""
``gridnode lifecycle`` (gridnode/client/lifecycle.py): the rules it prints, and an S3 server
(moto on loopback) taking them with ``--apply``, the bucket's other rules kept.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gridnode import keys
from gridnode.client.cli import parser
from gridnode.client.lifecycle import rules, run

pytest_plugins = ["tests.s3server"]


def by_id(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["ID"]: r for r in config["Rules"]}


class RulesTests:
    def test_retention_rules(self) -> None:
        """--retain-inputs and --retain-outputs expire inputs/ and outputs/ under the store's prefix;
        0 days is S3's least, 1; without them nothing of a job is expired."""
        made = by_id(rules("grid/", 0, 30))
        assert made["gridnode-retain-inputs"]["Filter"]["Prefix"] == "grid/" + keys.inputs_prefix()
        assert made["gridnode-retain-inputs"]["Expiration"]["Days"] == 1
        assert made["gridnode-retain-outputs"]["Expiration"]["Days"] == 30
        assert made["gridnode-retain-outputs"]["Filter"]["Prefix"] == "grid/outputs/"
        assert not {"gridnode-retain-inputs", "gridnode-retain-outputs"} & set(by_id(rules("")))

    def test_command_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Prints the JSON; a file: store or a bad day count is one coded line and exit 1 / 2."""
        assert run(parser().parse_args(["lifecycle", "--store", "s3://b/p", "--retain-outputs", "9"])) == 0
        assert by_id(json.loads(capsys.readouterr().out))["gridnode-retain-outputs"]["Expiration"]["Days"] == 9
        assert run(parser().parse_args(["lifecycle", "--store", "file:x"])) == 1
        assert "bad_config" in capsys.readouterr().err
        for bad in ("-1", "1.5", "99999", "x", "\u00b2", "\u0663"):
            with pytest.raises(SystemExit) as e:
                parser().parse_args(["lifecycle", "--store", "s3://b", "--retain-inputs", bad])
            assert e.value.code == 2


@pytest.mark.integration
class ApplyTests:
    def test_s3_takes_them_and_other_rules_stay(self, s3_client: Any, s3_bucket: str, s3_endpoint: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        """--apply against moto's PutBucketLifecycleConfiguration: gridnode's rules set (twice: the
        second replaces the first), a rule of the operator's own kept."""
        own = {"ID": "mine", "Filter": {"Prefix": "other/"}, "Status": "Enabled", "Expiration": {"Days": 3}}
        s3_client.put_bucket_lifecycle_configuration(Bucket=s3_bucket, LifecycleConfiguration={"Rules": [own]})
        for retain in ("0", "5"):
            args = parser().parse_args(["lifecycle", "--store", f"s3://{s3_bucket}/grid", "--retain-inputs", retain,
                                        "--apply", "--s3-endpoint", s3_endpoint])
            assert run(args) == 0, capsys.readouterr().err
        stored = by_id({"Rules": s3_client.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]})
        assert set(stored) == {"mine"} | set(by_id(rules("grid/", 5)))
        assert stored["gridnode-retain-inputs"]["Expiration"]["Days"] == 5
