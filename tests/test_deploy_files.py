"""
The operator's files under deploy/ are checked against the code they describe, so they cannot
drift from it: the S3 lifecycle rules name the store's real prefixes and expire nothing a job
still needs; the Prometheus rules use only metric and label names gridnode/metrics.py exports,
and promtool accepts the config and the rules and finds that the alerts fire on their cases.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gridnode import keys
from gridnode.metrics import Metrics

pytest_plugins = ["tests.s3server"]

ROOT = Path(__file__).resolve().parent.parent
LIFECYCLE = ROOT / "deploy" / "s3" / "lifecycle.json"
PROMETHEUS = ROOT / "deploy" / "prometheus"
#: the store prefix of docs/operations.md's examples (store = "s3://acme-video/grid")
STORE_PREFIX = "grid/"
#: labels Prometheus itself puts on every series of a target (job, instance) and those
#: prometheus.yml asks each target to carry (env, pool)
TARGET_LABELS = {"job", "instance", "env", "pool"}


def lifecycle_rules() -> list[dict[str, Any]]:
    rules = json.loads(LIFECYCLE.read_text())["Rules"]
    assert isinstance(rules, list) and rules
    return rules


def rule_prefix(rule: dict[str, Any]) -> str:
    prefix = rule["Filter"]["Prefix"]
    assert prefix.startswith(STORE_PREFIX), f"rule {rule['ID']} is outside the store prefix: {prefix!r}"
    return str(prefix[len(STORE_PREFIX):])


def top(key: str) -> str:
    """The first segment of a key, as a listing prefix: ``uploads/``."""
    return key.split("/", 1)[0] + "/"


class LifecycleTests:
    def test_rules_are_a_lifecycle_configuration(self) -> None:
        """Every rule has an ID, is enabled, filters on a prefix and does one of the two things
        `put-bucket-lifecycle-configuration` takes here; IDs are unique."""
        rules = lifecycle_rules()
        assert len({r["ID"] for r in rules}) == len(rules)
        for rule in rules:
            assert rule["Status"] == "Enabled"
            assert set(rule) <= {"ID", "Filter", "Status", "Expiration", "AbortIncompleteMultipartUpload"}
            assert ("Expiration" in rule) != ("AbortIncompleteMultipartUpload" in rule)
            rule_prefix(rule)

    def test_multipart_uploads_are_aborted_everywhere_under_the_store(self) -> None:
        """An incomplete multipart upload anywhere under the store prefix is aborted after a day:
        inputs and outputs are written multipart, and a node killed mid-write leaves parts billed."""
        aborts = [r for r in lifecycle_rules() if "AbortIncompleteMultipartUpload" in r]
        assert [rule_prefix(r) for r in aborts] == [""]
        assert aborts[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 1

    def test_expiries_name_the_real_prefixes(self) -> None:
        """The expiring prefixes are the ones gridnode/keys.py builds: idempotency entries after 2
        days (a key holds for 24 h: gridnode/idempotency.py), abandoned tus uploads after 7 (an
        upload expires 24 h after its last chunk; the nodes' sweep deletes it, the rule is the
        backstop for a pool that stopped)."""
        from gridnode import idempotency
        from gridnode.uploads.store import DEFAULT_EXPIRY

        expiring = {rule_prefix(r): r["Expiration"]["Days"] for r in lifecycle_rules() if "Expiration" in r}
        assert expiring == {keys.idempotency_prefix(): 2, top(keys.upload_prefix(keys.new_id())): 7,
                            keys.tombstones_prefix(): 30, top(keys.chunk_record(keys.new_id(), "chunk-1")): 7}
        assert top(keys.tombstone(keys.new_id())) == keys.tombstones_prefix()
        assert keys.idempotency_entry("ab12").startswith(keys.idempotency_prefix())
        assert 2 * 86400 > idempotency.TTL and 7 * 86400 > DEFAULT_EXPIRY

    def test_nothing_a_job_needs_is_expired(self) -> None:
        """No expiring rule covers a job's record, marker, input or outputs, or the registry:
        an unfinished job whose record or input vanished would be lost, and a finished job's
        outputs are the operator's to keep or delete (docs/operations.md, "Retention")."""
        job = keys.new_id()
        needed = [keys.job_record(job), keys.active_marker("n1", job), keys.legacy_marker(job), keys.input_source(job),
                  keys.output(job, "mp4-720p.mp4"), keys.node_record("dev", "p1", "n1"),
                  keys.nodes_list("dev", "p1")]
        for rule in lifecycle_rules():
            if "Expiration" in rule:
                prefix = rule_prefix(rule)
                assert prefix, f"rule {rule['ID']} expires the whole store"
                assert not [k for k in needed if k.startswith(prefix)], rule["ID"]

    def test_the_file_is_what_gridnode_lifecycle_prints(self) -> None:
        """deploy/s3/lifecycle.json is `gridnode lifecycle --store s3://acme-video/grid`'s output:
        one source for the rules (gridnode/client/lifecycle.py)."""
        from gridnode.client.lifecycle import rules

        assert json.loads(LIFECYCLE.read_text()) == rules(STORE_PREFIX)

    @pytest.mark.integration
    def test_s3_takes_the_configuration(self, s3_client: Any, s3_bucket: str) -> None:
        """An S3 server (moto) accepts the file as `aws s3api put-bucket-lifecycle-configuration
        --lifecycle-configuration file://deploy/s3/lifecycle.json` sends it, and keeps every rule."""
        s3_client.put_bucket_lifecycle_configuration(
            Bucket=s3_bucket, LifecycleConfiguration=json.loads(LIFECYCLE.read_text()))
        stored = s3_client.get_bucket_lifecycle_configuration(Bucket=s3_bucket)["Rules"]
        assert sorted(r["ID"] for r in stored) == sorted(r["ID"] for r in lifecycle_rules())



def exported() -> dict[str, set[str]]:
    """Every series name /metrics can show, with the labels of its family."""
    names: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        kind = getattr(metric, "_type", None)
        if kind is None:
            continue
        name, labels = metric._name, set(metric._labelnames)
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[kind]
        for suffix in suffixes:
            names[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def rule_exprs() -> list[str]:
    import yaml

    doc = yaml.safe_load((PROMETHEUS / "gridnode-rules.yml").read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def gridnode_strings() -> str:
    return "\n".join(p.read_text() for p in (ROOT / "gridnode").rglob("*.py"))


class PrometheusRulesTests:
    def test_every_metric_in_the_rules_is_exported(self) -> None:
        """Each gridnode_* name in an alert is one /metrics shows, and each label it matches on
        or groups by is one of that family's labels or a target label."""
        names = exported()
        exprs = rule_exprs()
        assert exprs
        for expr in exprs:
            used = re.findall(r"\b(gridnode_[a-z0-9_]+)\b", expr)
            for name in used:
                assert name in names, f"{name} is not exported by gridnode/metrics.py ({expr})"
            for name, matchers in re.findall(r"\b(gridnode_[a-z0-9_]+)\{([^}]*)\}", expr):
                for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                    assert label in names[name], f"{name} has no label {label} ({expr})"
            known = TARGET_LABELS.union(*(names[n] for n in used)) if used else TARGET_LABELS
            for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
                for label in filter(None, (s.strip() for s in group.split(","))):
                    assert label in known, f"grouping by {label}, which no series here has ({expr})"

    def test_label_values_in_the_rules_are_ones_the_code_uses(self) -> None:
        """A matched value (an error code, a member state, a scratch `when`) is a string the code
        has: a renamed code would otherwise silence its alert."""
        source = gridnode_strings()
        for expr in rule_exprs():
            for _name, matchers in re.findall(r"\b(gridnode_[a-z0-9_]+)\{([^}]*)\}", expr):
                for value in re.findall(r'\w+\s*(?:=~|=)\s*"([^"]*)"', matchers):
                    for word in value.split("|"):
                        assert f'"{word}"' in source, f"{word!r} appears nowhere in gridnode/ ({expr})"

    def test_a_renamed_metric_is_caught(self) -> None:
        """The check above fails on a name the code does not export (so it is not vacuous)."""
        names = exported()
        assert "gridnode_queue_capacity" in names and "gridnode_store_errors_total" in names
        assert "gridnode_store_errors" not in names and "gridnode_queue_lenght" not in names


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus; scripts/setup --test)")


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.integration
@needs_promtool
class PromtoolTests:
    def test_config_is_accepted(self, tmp_path: Path) -> None:
        """`promtool check config` accepts prometheus.yml with its token and targets files in place
        (it checks that the files exist) and the rule file it names."""
        config = (PROMETHEUS / "prometheus.yml").read_text().replace("/etc/prometheus/", f"{tmp_path}/")
        (tmp_path / "prometheus.yml").write_text(config)
        shutil.copy(PROMETHEUS / "gridnode-rules.yml", tmp_path)
        (tmp_path / "gridnode-ops.token").write_text("eyJhbGciOiJIUzI1NiJ9.e30.x\n")
        (tmp_path / "gridnode-targets.json").write_text(json.dumps(
            [{"targets": ["127.0.0.1:8080"], "labels": {"env": "dev", "pool": "default"}}]))
        result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "SUCCESS" in result.stdout + result.stderr

    def test_rules_are_accepted_and_fire(self) -> None:
        """`promtool check rules` accepts the rules, and `promtool test rules` finds each tested
        alert firing (and not firing) where gridnode-rules.test.yml says."""
        result = promtool("check", "rules", "gridnode-rules.yml", cwd=PROMETHEUS)
        assert result.returncode == 0, result.stdout + result.stderr
        result = promtool("test", "rules", "gridnode-rules.test.yml", cwd=PROMETHEUS)
        assert result.returncode == 0, result.stdout + result.stderr
