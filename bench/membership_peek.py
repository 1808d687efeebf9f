"""
The figures so far of a membership simulation saved with ``--checkpoint``: how far it got and the
false positives up to there, without going on with it; ``same_code`` says whether this checkout's
code saved it (only then can ``--resume`` go on with it here).

    .venv/bin/python bench/membership_peek.py .bench-state/fp24h.pkl

A run started from the command line pickles its classes as ``__main__``'s; they are found here
under the simulator's module instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.membership_sim as sim_module  # noqa: E402


def peek(path: str) -> dict[str, object]:
    main = sys.modules["__main__"]
    for name in ("Sim", "_Node", "Params"):
        if not hasattr(main, name):
            setattr(main, name, getattr(sim_module, name))
    sim, same_code = sim_module.load_any(path)
    p = sim.p
    return {
        "nodes": p.nodes, "loss": p.loss, "stall_fraction": p.stall_fraction, "seed": p.seed,
        "seconds": p.seconds, "simulated_s": sim.now,
        "false_positives": len(sim.fp_nodes - set(sim.kill_at)),
        "confirmed_false_deaths": len(sim.confirmed_false),
        "false_suspicions": sim.false_suspicions, "cpu_s": round(sim.cpu_s, 1),
        # False: saved by other code (it can be read, not resumed, here)
        "same_code": same_code,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(peek(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
