"""What the memory poller of the benchmarks costs the run it watches, on this machine.

    PYTHONPATH=. .venv/bin/python benchmarks/poller_cost.py --rounds 2

For a single-process per-tensor TIES merge (benchmarks/merge_single.py's child) and a K=1 `average` merge on a
running Ray head (benchmarks/merge_ray.py's child), alternately with and without the poller of
_common.run_measured: the wall time, and the CPU seconds the poller thread spent (this process's own CPU time,
which is idle otherwise). The numbers behind timing runs that nothing polls (see _common.run_measured).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from merge_ray import RunningCluster  # noqa: E402


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    paths = C.make_checkpoints(1000, 4)
    C.warm_kernels(4)
    C.warm_page_cache([paths["base"], *paths["experts"]])
    out = C.BENCH / "poller_out"
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(C.ROOT), "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}
    models = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]]}
    single = {**models, "method": "ties", "parameters": {"trim_scope": "tensor"}, "tile_mb": 64, "out": str(out)}
    cases = [("single-process ties (tensor), RSS at 50 Hz", [sys.executable, str(here / "merge_single.py"), "--_child",
                                                            "merge", json.dumps(single)], env, False, None)]
    head = RunningCluster(env, os.cpu_count() or 2)
    try:
        ray_spec = {**models, "method": "average", "out": str(out), "workers": 1, "address": head.address,
                    "cluster": {"num_cpus": os.cpu_count() or 2}}
        cases.append(("Ray K=1 average, running head, RSS + PSS at 20 Hz",
                      [sys.executable, str(here / "merge_ray.py"), "--_child", json.dumps(ray_spec)], head.env, True,
                      head.pids))
        print(f"load average {C.load_average()}")
        for r in range(args.rounds):
            for label, cmd, case_env, pss, extra in cases:
                for poll in (True, False):
                    cpu0 = own_cpu()
                    res = C.run_measured(cmd, env=case_env, timeout=600, pss=pss, extra_pids_fn=extra, poll=poll)
                    cpu = own_cpu() - cpu0
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
                    if res["rc"] != 0:
                        raise RuntimeError(res["stderr"][-3000:])
                    print(f"round {r + 1} {label}: {'polled' if poll else 'not polled'}: wall {res['wall_s']:.2f} s, "
                          f"poller CPU {cpu:.2f} s", flush=True)
    finally:
        head.stop()
    print(f"load average {C.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
