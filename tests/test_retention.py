"""
Retention (gridnode/retention.py): the sweep's lease, one node at a time, and what a round
deletes, on the memory store with a task.Clock. Real nodes: tests/test_jobs_api_nodes.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock

from gridnode import keys, retention
from gridnode.jobs import DONE, QUEUED, TRANSCODING, Job
from gridnode.retention import DAY, Retention, RetentionSweep
from gridnode.store.base import ObjectStore
from gridnode.store.memory import MemoryBackend

NOW = 1_790_000_000.0


def sweeper(store: ObjectStore, clock: Clock, node: str, inputs: int | None = 0, outputs: int | None = None
            ) -> RetentionSweep:
    return RetentionSweep(clock, store, node, retain_inputs=inputs, retain_outputs=outputs, period=600,
                          now=clock.seconds)


def job(store: ObjectStore, created: float, state: str, ended: float | None = None, outputs: int = 2,
        tenant: str = "") -> str:
    """A job stored as its node leaves it: record, input, ``outputs`` output files."""
    j = Job.new(keys.new_id(created), name="m.mov", presets=["poster"], node="n1", size=1, now=created,
                tenant=tenant)
    j.state = state
    j.updated = ended if ended is not None else created
    store.backend.put_bytes(keys.job_record(j.id), j.dumps())
    store.backend.put_bytes(keys.input_source(j.id), b"input")
    for n in range(outputs):
        store.backend.put_bytes(keys.output(j.id, f"hls/seg{n}.ts"), b"out")
    return j.id


def fired(d: Any) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "did not fire"
    if hasattr(got[0], "raiseException"):
        got[0].raiseException()
    return got[0]


def has(store: ObjectStore, key: str) -> bool:
    return bool(store.backend.list(key).items)


@pytest.fixture
def store() -> ObjectStore:
    return ObjectStore.synchronous(MemoryBackend())


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


class LeaseTests:
    def test_one_node_at_a_time(self, store: ObjectStore, clock: Clock) -> None:
        """The first node takes the lease; another is refused until it runs out; the holder renews it."""
        a, b = sweeper(store, clock, "a"), sweeper(store, clock, "b")
        assert fired(a.take_lease()) is True
        assert fired(b.take_lease()) is False
        clock.advance(600)
        assert fired(a.take_lease()) is True and fired(b.take_lease()) is False
        clock.advance(1.5 * 600 + 1)  # a died: its lease ran out
        assert fired(b.take_lease()) is True and fired(a.take_lease()) is False

    def test_a_race_is_won_once(self, store: ObjectStore, clock: Clock) -> None:
        """Two nodes that both read no lease: the conditional create lets one write."""
        a, b = sweeper(store, clock, "a"), sweeper(store, clock, "b")
        real = store.backend.get_bytes
        reads: list[str] = []

        def stale(key: str, **kw: Any) -> Any:
            reads.append(key)
            from gridnode.errors import NotFound
            raise NotFound(key)

        store.backend.get_bytes = stale  # type: ignore[method-assign]
        assert fired(a.take_lease()) is True
        assert fired(b.take_lease()) is False
        store.backend.get_bytes = real  # type: ignore[method-assign]
        assert b'"a"' in store.backend.get_bytes(keys.retention_lease())[0]

    def test_a_garbage_lease_is_taken_over(self, store: ObjectStore, clock: Clock) -> None:
        store.backend.put_bytes(keys.retention_lease(), b"\x00not json")
        assert fired(sweeper(store, clock, "a").take_lease()) is True


class SweepTests:
    def test_zero_days_takes_finished_inputs_only(self, store: ObjectStore, clock: Clock) -> None:
        """Retention 0 days: a finished job's input goes at the next round; a queued or running job
        keeps its input, every job its outputs; a job with no record is left alone."""
        done = job(store, NOW - 100, DONE, ended=NOW - 50)
        queued = job(store, NOW - 90, QUEUED)
        running = job(store, NOW - 80, TRANSCODING)
        orphan_input = keys.input_source(keys.new_id(NOW - 70))
        store.backend.put_bytes(orphan_input, b"x")
        s = sweeper(store, clock, "a", inputs=0)
        fired(s.round())
        assert not has(store, keys.input_source(done))
        assert all(has(store, keys.input_source(j)) for j in (queued, running))
        assert has(store, orphan_input) and all(has(store, keys.outputs_prefix(j)) for j in (done, queued))
        counted = {what: s.metrics.registry.get_sample_value("gridnode_retention_deleted_total", {"what": what})
                   for what in ("inputs", "outputs")}
        assert counted == {"inputs": 1, "outputs": None}

    def test_days_count_from_the_end(self, store: ObjectStore, clock: Clock) -> None:
        """Outputs kept 1 day: those of a job that ended 2 days ago go (every file), those of a job
        made 3 days ago that ended an hour ago stay, and so does every input."""
        old = job(store, NOW - 3 * DAY, DONE, ended=NOW - 2 * DAY, outputs=250)
        late = job(store, NOW - 3 * DAY + 1, DONE, ended=NOW - 3600)
        fired(sweeper(store, clock, "a", inputs=None, outputs=1).round())
        assert not has(store, keys.outputs_prefix(old)) and has(store, keys.outputs_prefix(late))
        assert has(store, keys.input_source(old))

    def test_a_tenants_days_replace_the_pools(self, store: ObjectStore, clock: Clock) -> None:
        """Inputs kept 30 days, acme's 1, keep's for ever: of jobs that all ended 2 days ago only
        acme's input goes; 40 days ago, the pool's go too, keep's never."""
        ended = {t: job(store, NOW - 3 * DAY, DONE, ended=NOW - 2 * DAY, tenant=t) for t in ("", "acme", "keep")}
        old = {t: job(store, NOW - 50 * DAY, DONE, ended=NOW - 40 * DAY, tenant=t) for t in ("", "acme", "keep")}
        inputs = Retention(30, (("acme", 1),))
        keep_forever = Retention.parse(["30 acme=1"])
        assert keep_forever == inputs and inputs.days("keep") == 30 and inputs.shortest() == 1
        s = sweeper(store, clock, "a", inputs=Retention(30, (("acme", 1), ("keep", 36500))))
        fired(s.round())
        assert [t for t, j in ended.items() if not has(store, keys.input_source(j))] == ["acme"]
        assert [t for t, j in old.items() if not has(store, keys.input_source(j))] == ["", "acme"]
        only_acme = sweeper(store, clock, "a", inputs=Retention(None, (("acme", 0),)))
        late = job(store, NOW - DAY, DONE, ended=NOW - 60, tenant="other")
        fired(only_acme.round())
        assert has(store, keys.input_source(late)) and has(store, keys.input_source(old["keep"]))

    @pytest.mark.parametrize("values", [["x"], ["-1"], ["\u00b2"], ["acme=\u0663"], ["36501"], ["acme="], ["=3"],
                                        ["a=b=3"], ["3 4"], ["acme=1", "acme=2"], ["1.5"], ["acme=1x"],
                                        ["a/b c=1 \x00=2"]])
    def test_bad_retention_values(self, values: list[str]) -> None:
        """Hostile or mistaken values are refused with a message, never taken in part."""
        with pytest.raises(ValueError):
            Retention.parse(values)

    def test_a_round_is_bounded_and_goes_on(self, store: ObjectStore, clock: Clock,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A round reads at most MAX_JOBS records; the next round goes on where it stopped."""
        monkeypatch.setattr(retention, "MAX_JOBS", 3)
        ids = [job(store, NOW - 1000 + n, DONE) for n in range(7)]
        s = sweeper(store, clock, "a")
        left = []
        for _ in range(3):
            fired(s.round())
            left.append(sum(has(store, keys.input_source(j)) for j in ids))
        assert left == [4, 1, 0]

    def test_not_the_holder_sweeps_nothing(self, store: ObjectStore, clock: Clock) -> None:
        """A node that does not hold the lease deletes nothing."""
        done = job(store, NOW - 100, DONE)
        assert fired(sweeper(store, clock, "b").take_lease()) is True
        fired(sweeper(store, clock, "a").round())
        assert has(store, keys.input_source(done))

    def test_the_service_sweeps_on_its_timer(self, store: ObjectStore, clock: Clock) -> None:
        """Started, the sweep runs within 1.25 periods and again after; stopped, never again."""
        first = job(store, NOW - 100, DONE)
        s = sweeper(store, clock, "a")
        s.startService()
        clock.advance(600 * 1.25)
        assert not has(store, keys.input_source(first))
        second = job(store, NOW, DONE)
        clock.advance(600 * 1.25)
        assert not has(store, keys.input_source(second))
        fired(s.stopService())
        third = job(store, NOW + 1, DONE)
        clock.advance(600 * 5)
        assert has(store, keys.input_source(third))


class ConfigTests:
    def test_from_the_command_line_and_the_config_file(self, tmp_path: Any) -> None:
        """``--retain-inputs`` given several times adds up; a config file's integer is the pool's
        days, a list holds items; a bad value stops the node with a line naming the option."""
        from gridnode.config import build_config
        from gridnode.errors import ConfigError
        from gridnode.tap import Options

        options = Options()
        options.parseOptions(["--work-dir", str(tmp_path), "--retain-inputs", "30", "--retain-inputs", "acme=1",
                              "--retain-outputs", "bob=7"])
        assert options.node_config is not None
        assert options.node_config.retain_inputs == Retention(30, (("acme", 1),))
        assert options.node_config.retain_outputs == Retention(None, (("bob", 7),))
        assert build_config(file={"retain-inputs": 5}).retain_inputs == Retention(5)
        assert build_config(file={"retain-inputs": ["5", "acme=0"]}).retain_inputs == Retention(5, (("acme", 0),))
        assert not build_config().retain_inputs
        for bad in ("acme=x", True, 1.5, {"acme": 1}):
            with pytest.raises(ConfigError) as e:
                build_config(file={"retain-inputs": bad})
            assert "retain-inputs" in str(e.value)
