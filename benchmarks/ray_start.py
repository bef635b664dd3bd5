"""The embedded local Ray's start, as a command or a study meets it: `ensure_ray()` in a fresh process, then two
tasks on the prestarted workers that import what a study's first evaluations import (torch, transformers), timed
from submission to both results. With --checkouts A B, an interleaved A/B: each round runs one fresh process per
checkout, in turn, that checkout first on PYTHONPATH (its Ray workers import that code).

    PYTHONPATH=. .venv/bin/python benchmarks/ray_start.py [--checkouts A B] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PROBE = r"""
import json, time
t0 = time.perf_counter()
import ray
from mergescale.cluster.session import ensure_ray
ensure_ray()
t1 = time.perf_counter()

@ray.remote(num_cpus=1)
def first_task():
    import torch, transformers  # noqa: F401 - what a study's first evaluation imports
    return 1

ray.get([first_task.remote() for _ in range(2)])
t2 = time.perf_counter()
print(json.dumps({"ray_start_s": t1 - t0, "first_tasks_s": t2 - t1}))
"""


def probe(checkout: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=checkout)
    if r.returncode != 0:
        sys.exit(f"{checkout}: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkouts", nargs="+", default=["."])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {c: [] for c in args.checkouts}
    for _ in range(args.rounds):
        for c in args.checkouts:
            runs[c].append(probe(c))
    print(f"Machine: {_common.machine_line()}; load average {_common.load_average()}\n")
    print("| checkout | ensure_ray() (s), per round | two first tasks importing torch + transformers (s), per round |")
    print("|---|---|---|")
    for c, rs in runs.items():
        starts = " / ".join(f"{r['ray_start_s']:.2f}" for r in rs)
        firsts = " / ".join(f"{r['first_tasks_s']:.2f}" for r in rs)
        print(f"| {c} | {starts} | {firsts} |")


if __name__ == "__main__":
    main()
