"""Where a Ray merge's time goes on a running head, and an interleaved A/B of two checkouts.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_phases.py                                   # this checkout
    PYTHONPATH=. .venv/bin/python benchmarks/ray_phases.py --checkouts . /tmp/old --rounds 3  # A/B, interleaved

For each round and each checkout (in turn): a Ray head is started with that checkout first on PYTHONPATH (so its
actors import that code), then a fresh driver process per K merges the 1 GB-per-model checkpoints of
benchmarks/merge_single.py and reports: the driver's import time, its wall time from start to exit, the manifest's
actor start and total times, and each actor's busy seconds and MB/s. The head is stopped after each round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from merge_ray import RunningCluster  # noqa: E402

DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from mergescale.cluster.merge import run_distributed_merge
t1 = time.perf_counter()
spec = json.loads(sys.argv[1])
m = run_distributed_merge(spec["config"], spec["out"], workers=spec["workers"], address=spec["address"],
                          overwrite=True, progress=False)
print(json.dumps({"import_s": t1 - t0, "timing": m["timing"],
                  "actors": [(a["busy_s"], a["MB_per_s"]) for a in m["distributed"]["actors"]]}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkouts", nargs="+", default=["."])
    ap.add_argument("--method", default="average")
    ap.add_argument("--params", default="{}", help="the method's parameters, as JSON")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--model-mb", type=float, default=1000)
    args = ap.parse_args(argv)
    paths = C.make_checkpoints(args.model_mb, 4)
    C.warm_page_cache([paths["base"], *paths["experts"]])
    cpus = os.cpu_count() or 2
    out = C.BENCH / "phases_out"
    for r in range(args.rounds):
        for checkout in args.checkouts:
            root = str(Path(checkout).resolve())
            env = {**os.environ, "PYTHONPATH": root}
            head = RunningCluster(env, cpus)
            try:
                for k in args.workers:
                    config = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]],
                              "method": args.method, "parameters": json.loads(args.params), "tile_mb": 64,
                              "cluster": {"num_cpus": cpus / k}}
                    spec = {"config": config, "out": str(out), "workers": k, "address": head.address}
                    t0 = time.perf_counter()
                    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], env=head.env, cwd="/tmp",
                                         capture_output=True, text=True, timeout=600)
                    wall = time.perf_counter() - t0
                    if res.returncode != 0:
                        raise RuntimeError(res.stderr[-3000:])
                    got = json.loads(res.stdout.strip().splitlines()[-1])
                    t = got["timing"]
                    actors = ", ".join(f"{b:.2f} s {mb:.0f} MB/s" for b, mb in got["actors"])
                    print(f"round {r + 1} {root} K={k}: wall {wall:.2f} s, imports {got['import_s']:.2f} s, "
                          f"actor start {t['actor_start_s']:.2f} s, statistics {t['statistics_s']:.2f} s, merge total "
                          f"{t['total_s']:.2f} s; actors busy: {actors}",
                          flush=True)
            finally:
                head.stop()
    print(f"load average: {C.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
