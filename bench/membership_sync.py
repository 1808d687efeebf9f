"""
Anti-entropy at sizes the whole-pool simulator cannot hold (every node of a simulated pool keeps a
table of every other: N² entries). Here two real ``SwimMachine``s hold tables of N members with
EC2 instance ids and public DNS names, and sync the way their timers do (the opener's pool-wide
digest, then whatever the machines answer), the messages passing between them unchanged:

- ``steady``: equal tables.
- ``missed``: the laggard missed ``--missed`` updates the other holds (a quarter each: joins,
  refutations, deaths, leaves), as a node does that was cut off or stalled through them.
- ``joiner``: a node that knows one member only (all buckets differ).
- ``whole``: for comparison, the table as one message (the sync before buckets; memberlist's
  push-pull).

For each: messages, payload bytes, the largest payload against the wire's limit, and whether the
laggard then holds what the other holds (same digest, every missed update applied).

    .venv/bin/python bench/membership_sync.py --nodes 5000 --json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.membership_sim import ec2_address, ec2_id, payload_size  # noqa: E402
from gridnode.membership import wire  # noqa: E402
from gridnode.membership.swim import (  # noqa: E402
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Gossip,
    Message,
    SwimConfig,
    SwimMachine,
    SyncDigest,
    SyncState,
    Update,
)


def machine(me: tuple[str, str], members: list[tuple[str, str]], seed: int) -> SwimMachine:
    m = SwimMachine(me[0], me[1], config=SwimConfig(), rng=random.Random(seed))
    m.add_members(members, 0.0)
    return m


def converse(a: SwimMachine, b: SwimMachine) -> list[Message]:
    """``a`` opens a sync with ``b`` (as its sync timer does); every sync message both send after."""
    d, n = a.digest()
    queue: list[Message] = [SyncDigest(b.me, b.address, a.me, a.address, a.incarnation, d, n)]
    by_id = {a.me: a, b.me: b}
    sent: list[Message] = []
    while queue:
        msg = queue.pop(0)
        sent.append(msg)
        queue += [o for o in by_id[msg.dest].receive(msg, 1.0) if isinstance(o, SyncDigest | SyncState)]
    return sent


def figures(name: str, sent: list[Message], converged: bool, started: float) -> dict[str, Any]:
    sizes = [payload_size(m) for m in sent]
    return {"scenario": name, "messages": len(sent), "bytes": sum(sizes), "max_message_bytes": max(sizes),
            "limit": wire.MAX_PAYLOAD, "over_limit": sum(s > wire.MAX_PAYLOAD for s in sizes),
            "members_sent": sum(len(m.members) for m in sent if isinstance(m, SyncState)),
            "converged": converged, "cpu_s": round(time.process_time() - started, 3)}


def run(nodes: int, missed: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    pool = [(ec2_id(rng), ec2_address(rng)) for _ in range(nodes)]
    out = []

    started = time.process_time()
    a, b = machine(pool[0], pool, 1), machine(pool[1], pool, 2)
    out.append(figures("steady", converse(a, b), a.digest() == b.digest(), started))

    # b hears of what a misses; a quarter each: joins, refutations, deaths, leaves
    started = time.process_time()
    q = max(1, missed // 4)
    changed = rng.sample(pool[2:], 3 * q)
    news = [Update(m, addr, 0, ALIVE, m) for m, addr in ((ec2_id(rng), ec2_address(rng)) for _ in range(q))]
    news += [Update(m, addr, 1, ALIVE, m) for m, addr in changed[:q]]
    news += [Update(m, addr, 0, DEAD, pool[1][0]) for m, addr in changed[q:2 * q]]
    news += [Update(m, addr, 0, LEFT, m) for m, addr in changed[2 * q:]]
    for i in range(0, len(news), 8):
        b.receive(Gossip(b.me, b.address, pool[2][0], pool[2][1], 0, news[i:i + 8]), 0.5)
    sent = converse(a, b)
    # a death arrives as a suspicion (the laggard runs its own check); the rest as they are
    applied = all(a.member(u.member) is not None and
                  (a.member(u.member).state, a.member(u.member).incarnation)  # type: ignore[union-attr]
                  == ((SUSPECT if u.state == DEAD else u.state), u.incarnation) for u in news)
    live_equal = {v.member for v in a.members() if v.state == ALIVE} == \
        {v.member for v in b.members() if v.state == ALIVE} - {u.member for u in news if u.state == DEAD}
    out.append({**figures("missed", sent, applied and live_equal, started), "missed": len(news)})

    started = time.process_time()
    joiner = machine((ec2_id(rng), ec2_address(rng)), [pool[1]], 3)
    old = machine(pool[1], pool, 4)
    sent = converse(joiner, old)
    out.append(figures("joiner", sent, joiner.digest() == old.digest() and joiner.live_count() == nodes + 1,
                       started))

    whole = SyncState(*pool[1], *pool[0], 0, [Update(m, addr, 0, ALIVE, m) for m, addr in pool], True)
    size = payload_size(whole)
    out.append({"scenario": "whole", "messages": 1, "bytes": size, "max_message_bytes": size,
                "limit": wire.MAX_PAYLOAD, "over_limit": int(size > wire.MAX_PAYLOAD),
                "members_sent": nodes, "converged": None})
    for o in out:
        o["nodes"] = nodes
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--nodes", type=int, default=5000)
    ap.add_argument("--missed", type=int, default=0, help="updates the laggard missed (default N/100)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object a line on stdout")
    a = ap.parse_args(argv)
    results = run(a.nodes, a.missed or max(4, a.nodes // 100), a.seed)
    for o in results:
        if a.json:
            print(json.dumps(o))
        else:
            print("  ".join(f"{k}={v}" for k, v in o.items()))
    return 0 if all(o["converged"] is not False and (o["scenario"] == "whole" or not o["over_limit"])
                    for o in results) else 1


if __name__ == "__main__":
    sys.exit(main())
