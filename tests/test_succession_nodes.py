"""
One actor per event, on real nodes: 5 twistd nodes on a moto S3 server, behind
a proxy that counts every request. A node killed with kill -9 while it has a
job running and two queued: each of its jobs is adopted once, its registry
record deleted by one request, its jobs found by a LIST of its own prefix
(never of every marker). Then the S3 server is frozen (SIGSTOP) for more than
twice the old job lease while the survivors' jobs run: nothing is adopted.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted

from tests.helpers import free_port, sleep, wait_for
from tests.media_samples import work_clip
from tests.nodes import NodeProcess, get_json, upload, wait_job
from tests.s3server import MotoServer, SlowDownProxy, make_bucket
from tests.test_chaos import kill_machine

pytest_plugins = ["tests.s3server"]
pytestmark = pytest.mark.integration

#: the old lease these nodes are given (``--job-lease``): what a frozen store once outlasted
LEASE = 3
#: seconds of the last standby watcher's turn, at most (gridnode/succession.py: 2.5 x STANDBY)
TURNS = 13


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 s of 640x360 with audio: a few seconds of work per job."""
    return work_clip(tmp_path_factory.mktemp("succession") / "clip.mp4", 20)


def node(tmp_path: Path, endpoint: str, bucket: str, name: str) -> NodeProcess:
    return NodeProcess(tmp_path / name, [
        "--store", f"s3://{bucket}/grid", "--s3-endpoint", endpoint, "--pool", "acts", "--node-id", name,
        "--heartbeat", "1", "--job-lease", str(LEASE), "--workers", "1", "--queue", "8", "--min-free", "0",
        "--http", f"tcp:{free_port()}:interface=127.0.0.1", "--peer", f"tcp:{free_port()}:interface=127.0.0.1"])


def alive(n: NodeProcess) -> list[str]:
    """The peers ``n`` holds alive."""
    _, view = get_json(n.url + "/peers")
    return [p["id"] for p in view["peers"] if p["id"] != view["node"] and p["state"] == "alive"]


def listed_prefixes(requests: list[tuple[str, str]]) -> list[str]:
    """The prefixes of the LISTs among ``requests`` (path-style: GET /bucket?list-type=2&prefix=)."""
    found = []
    for method, path in requests:
        query = parse_qs(urlsplit(path).query)
        if method == "GET" and "list-type" in query:
            found.append(query.get("prefix", [""])[0])
    return found


def adoptions(nodes: list[NodeProcess]) -> list[tuple[str, str, str]]:
    """Every "job J adopted from P" line in the nodes' logs: (job, previous owner, adopter)."""
    found = []
    for n in nodes:
        for job, previous in re.findall(r"job (\w+) adopted from ([\w-]+)", n.log.read_text(errors="replace")):
            found.append((job, previous, n.folder.name))
    return found


class OneActorTests:
    @pytest_twisted.inlineCallbacks
    def test_a_death_acted_on_once_and_a_frozen_store_adopts_nothing(self, tmp_path: Path, clip: Path,
                                                                       own_moto: MotoServer) -> None:
        """kill -9 on a node with a job running and two queued: each is adopted once (attempts 2),
        done; exactly one DELETE of its registry record reaches the store; its jobs are found by
        LISTs of its own prefix (one per watcher at most), never of every marker. Then moto is
        SIGSTOPped for twice the lease and more while every survivor runs a job and queues
        another: none is adopted, each ends done on its own node at attempt 1."""
        moto = own_moto
        endpoint = moto.endpoint
        bucket = make_bucket(endpoint)
        proxy = SlowDownProxy(endpoint, lambda method, path: False)
        nodes = [node(tmp_path, proxy.endpoint, bucket, f"a{i}") for i in range(5)]
        try:
            for n in nodes:
                n.start()
            for n in nodes:
                yield n.wait_ready()
            names = {n.folder.name for n in nodes}
            try:
                yield wait_for(lambda: all(set(alive(n)) == names - {n.folder.name} for n in nodes), timeout=60)
            except AssertionError:
                raise AssertionError({n.folder.name: get_json(n.url + "/peers")[1] for n in nodes}) from None
            victim, survivors = nodes[2], nodes[:2] + nodes[3:]
            theirs = []
            for _ in range(3):
                status, _, job = upload(victim.url, clip, "mp4-480p")
                assert status == 201, job
                theirs.append(job["id"])
            yield wait_job(victim.url, theirs[0], {"transcoding"}, min_progress=0.05, timeout=60)
            assert [get_json(f"{victim.url}/jobs/{j}")[1]["state"] for j in theirs[1:]] == ["queued", "queued"]
            del proxy.requests[:]
            killed = time.monotonic()
            kill_machine(victim)
            finals = []
            for job_id in theirs:
                finals.append((yield wait_job(survivors[0].url, job_id, timeout=180)))
            assert [(j["state"], j["attempts"]) for j in finals] == [("done", 2)] * 3, finals
            yield sleep(max(0.0, TURNS - (time.monotonic() - killed)))  # every standby's turn has come
            adopted = adoptions(nodes)
            assert sorted(j for j, previous, _ in adopted) == sorted(theirs), adopted
            assert {previous for _, previous, _ in adopted} == {victim.folder.name}
            sent = list(proxy.requests)
            record = f"/grid/registry/dev/acts/nodes/{victim.folder.name}.json"
            deletes = [p for m, p in sent if m == "DELETE" and urlsplit(p).path.endswith(record)]
            assert len(deletes) == 1, [p for m, p in sent if m == "DELETE"]
            deleted_by = [n.folder.name for n in survivors if "deleted the registry record of dead peer" in n.text()]
            assert len(deleted_by) == 1, deleted_by
            lists = listed_prefixes(sent)
            assert "grid/active/" not in lists, lists
            assert 1 <= lists.count(f"grid/active/{victim.folder.name}/") <= 3, lists

            # The store freezes while every survivor runs a job and queues another.
            ours = {}
            for n in survivors:
                for _ in range(2):
                    status, _, job = upload(n.url, clip, "mp4-480p")
                    assert status == 201, job
                    ours[job["id"]] = n.folder.name
            first = next(iter(ours))
            # (a fast machine may have converted it already: the second of each node's jobs is
            # still queued or running while the store is frozen)
            yield wait_job(survivors[0].url, first, {"transcoding", "storing", "done"}, min_progress=0.02,
                           timeout=60)
            assert moto.process is not None
            os.kill(moto.process.pid, signal.SIGSTOP)
            try:
                yield sleep(2 * LEASE + 3)
            finally:
                os.kill(moto.process.pid, signal.SIGCONT)
            for job_id, owner in ours.items():
                job = yield wait_job(survivors[0].url, job_id, timeout=240)
                assert (job["state"], job["node"], job["attempts"]) == ("done", owner, 1), job
            assert len(adoptions(nodes)) == 3  # the victim's, nothing since
            status, listing = get_json(survivors[0].url + "/registry/nodes.json")
            assert sorted(n["id"] for n in listing["nodes"]) == sorted(n.folder.name for n in survivors)
        finally:
            for n in nodes:
                n.stop()
            proxy.close()
