"""Where a Ray merge's memory is: the peak RSS of every process (driver, merge actors, the head's own processes),
with its anonymous and file-backed parts, on a running head as in benchmarks/merge_ray.py.

    PYTHONPATH=. .venv/bin/python benchmarks/ray_memory.py --method ties --params '{"trim_scope": "tensor"}' --workers 2
    PYTHONPATH=. .venv/bin/python benchmarks/ray_memory.py --checkout /tmp/old   # another checkout's code

merge_ray.py gives the sum over the tree; this says which process holds what (torch and numba in a process are
~180 and ~65 MB of RSS here; an actor's mapped input rows are its file-backed growth during a pass). Polled at
20 Hz, so the merge runs slower than unpolled. Inputs: the 1 GB-per-model checkpoints of merge_single.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import merge_ray as M  # noqa: E402


def role(proc) -> str:
    """A process's role: its Ray title (ray::MergeActor.merge, ray::IDLE, ...), "driver", or its executable."""
    cmd = proc.cmdline()
    if not cmd:
        return "?"
    if cmd[0].startswith("ray::"):
        return cmd[0]
    if "--_child" in cmd:
        return "driver"
    return " ".join(Path(c).name for c in cmd[:3] if not c.startswith("-"))[:50]


def main(argv=None) -> int:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--params", default='{"trim_scope": "tensor", "density": 0.2}')
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--checkout", type=Path, default=C.ROOT, help="whose mergescale the head and driver import")
    args = ap.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(args.checkout.resolve()), "RAY_USAGE_STATS_ENABLED": "0",
           "TQDM_DISABLE": "1"}
    paths = C.make_checkpoints(args.model_mb, 4)
    C.warm_kernels(4)
    C.warm_page_cache([paths["base"]] + paths["experts"])
    cpus = os.cpu_count() or 1
    cluster = M.RunningCluster(env, cpus)
    out = C.BENCH / "out-ray-memory" / "merged"
    try:
        spec = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]], "method": args.method,
                "parameters": json.loads(args.params), "out": str(out), "workers": args.workers,
                "cluster": {"num_cpus": max(1, cpus // args.workers)}, "address": cluster.address}
        stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: nothing reads it while the poll loop runs
        proc = subprocess.Popen([sys.executable, str(Path(M.__file__).resolve()), "--_child", json.dumps(spec)],
                                env=cluster.env, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd="/tmp")
        peak: dict = collections.defaultdict(lambda: (0, "", 0, 0))  # pid -> (rss, role at the peak, anon, file)
        total = 0
        while proc.poll() is None:
            now = 0
            for pid in [proc.pid] + cluster.pids():
                try:
                    p = psutil.Process(pid)
                    rss = p.memory_info().rss
                    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
                    kb = {k: int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}
                    if rss > peak[pid][0]:
                        peak[pid] = (rss, role(p), kb["RssAnon"], kb["RssFile"])
                    now += rss
                except (psutil.Error, OSError, KeyError):
                    pass
            total = max(total, now)
            time.sleep(0.05)
        lines = proc.stdout.read().strip().splitlines()
        if proc.returncode != 0 or not lines:
            stderr.seek(0)
            raise RuntimeError(f"the merge failed (rc {proc.returncode}):\n{stderr.read()[-3000:]}")
        result = json.loads(lines[-1])
    finally:
        cluster.stop()
        shutil.rmtree(out.parent, ignore_errors=True)
    print(f"{args.checkout.resolve()}: {args.method} {args.params}, K={args.workers}, running head: "
          f"merge {result['timing']['total_s']:.1f} s (polled), peak RSS summed over the tree {C.fmt_bytes(total)}")
    print(f"{'peak RSS':>10} {'anon':>9} {'file':>9}  process (role at its peak)")
    for pid, (rss, what, anon, file) in sorted(peak.items(), key=lambda kv: -kv[1][0]):
        print(f"{C.fmt_bytes(rss):>10} {C.fmt_bytes(anon):>9} {C.fmt_bytes(file):>9}  {what} (pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
