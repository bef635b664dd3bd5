"""Where a merge's extra CPU goes when its inputs come from the disk: the same merge, each run in a fresh process,
with its inputs in one of three page-cache states, interleaved round by round:

- warm:      every input file read once beforehand (as merge_single.py's default table);
- populated: evicted, then every file's pages brought back by the kernel alone (mmap + MADV_POPULATE_READ, no
             byte touched by a CPU in user mode): the pages are as freshly read as from a cold cache, but the
             merge runs with no disk read beside it;
- cold:      evicted; the merge's own reader brings them from the disk while the kernels run.

    PYTHONPATH=. .venv/bin/python benchmarks/cold_cost.py                       # per-tensor TIES, 3 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/cold_cost.py --method dare_ties --rounds 4

For each run: wall time, the process's user and system CPU seconds, the user seconds of numba's kernel threads
alone (the threads the kernels' warm-up started, read from /proc/self/task), and the machine's steal time over the
run (/proc/stat: time the hypervisor says it ran something else on our virtual CPUs). Then, without a merge:
evicted, populated, and one byte of every input page read in user mode, twice. Same checkpoints as
benchmarks/merge_single.py (generated there if missing).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from merge_single import METHODS  # noqa: E402
from read_cost import FIELDS, cpu_times  # noqa: E402

STATES = ("warm", "populated", "cold")


def _threads() -> dict[str, tuple[float, float]]:
    """user, system CPU seconds of each live thread of this process."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[tid] = (int(fields[11]) / hz, int(fields[12]) / hz)
    return out


def _steal_s() -> float:
    return cpu_times()[FIELDS.index("steal")] / os.sysconf("SC_CLK_TCK")


def populate(paths: list[Path]) -> None:
    """Bring every file's pages into the page cache without a user-mode read of their bytes."""
    for p in paths:
        for f in sorted(Path(p).glob("*.safetensors")):
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
                mm.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))


def touch_pages(paths: list[Path]) -> tuple[float, float]:
    """Wall and user + system CPU seconds of reading one byte of every page of the files, in user mode."""
    import numpy as np

    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for p in paths:
        for f in sorted(Path(p).glob("*.safetensors")):
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
                a = np.frombuffer(mm, np.uint8)
                int(a[::mmap.PAGESIZE].max())
                del a
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter() - t0, r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime


def child(spec: dict) -> dict:
    import torch  # noqa: F401 - imported before the kernel threads are told apart

    import mergescale
    from mergescale.merge import kernels

    before = set(_threads())
    kernels.warm_up(len(spec["experts"]))
    workers = set(_threads()) - before  # numba's kernel threads start at the first parallel launch
    out = spec.pop("out")
    t0_threads, r0, steal0 = _threads(), resource.getrusage(resource.RUSAGE_SELF), _steal_s()
    t0 = time.perf_counter()
    mergescale.merge(spec, out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    r1, steal1, t1_threads = resource.getrusage(resource.RUSAGE_SELF), _steal_s(), _threads()
    kernel_user = sum(t1_threads[t][0] - t0_threads[t][0] for t in workers if t in t0_threads and t in t1_threads)
    return {"wall_s": wall, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
            "kernel_threads": len(workers), "kernel_user_s": kernel_user, "steal_s": steal1 - steal0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--method", default="ties (tensor)", choices=list(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return 0

    paths = C.make_checkpoints(args.model_mb, args.experts)
    models = [paths["base"], *paths["experts"]]
    C.warm_kernels(args.experts)
    method, params = METHODS[args.method]
    out = C.BENCH / "out-cold-cost"
    spec = {"base": str(paths["base"]), "experts": [str(p) for p in paths["experts"]], "method": method,
            "parameters": params, "out": str(out / "merged")}
    env = {**os.environ, "PYTHONPATH": str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"{C.machine_line()}\n{args.method}, base + {args.experts} experts of "
          f"{C.fmt_bytes(C.model_bytes(paths['base']))}; load average {C.load_average()}", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in STATES}
    try:
        for rnd in range(args.rounds):
            for state in STATES:
                if state == "warm":
                    C.warm_page_cache(models)
                else:
                    left = C.drop_page_cache(models)
                    if left > 0.01:
                        print(f"warning: {left:.1%} of the inputs still cached after eviction", flush=True)
                    if state == "populated":
                        populate(models)
                r = C.run_measured([sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)],
                                   env=env, timeout=3600, poll=False)
                if r["rc"] != 0 or r["result"] is None:
                    raise RuntimeError(f"merge child failed (rc {r['rc']}):\n{r['stderr'][-4000:]}")
                runs[state].append(r["result"])
                res = r["result"]
                print(f"round {rnd + 1} {state:9s} wall {res['wall_s']:5.2f} s  user {res['user_s']:5.2f}  "
                      f"sys {res['sys_s']:4.2f}  kernel threads' user {res['kernel_user_s']:5.2f} "
                      f"({res['kernel_threads']} threads)  steal {res['steal_s']:4.2f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # The same without a merge: pages brought in by the kernel alone, then one byte of each read in user mode, twice.
    C.drop_page_cache(models)
    populate(models)
    first, again = touch_pages(models), touch_pages(models)
    pages = sum(C.model_bytes(p) for p in models) // mmap.PAGESIZE
    print(f"one byte of each of the {pages:,} input pages read after populating them: first {first[0]:.2f} s "
          f"({first[1]:.2f} CPU-s), again {again[0]:.2f} s ({again[1]:.2f} CPU-s)", flush=True)
    rows = []
    for state in STATES:
        med = {k: statistics.median(r[k] for r in runs[state])
               for k in ("wall_s", "user_s", "sys_s", "kernel_user_s", "steal_s")}
        rows.append([state, *(f"{med[k]:.2f}" for k in ("wall_s", "user_s", "sys_s", "kernel_user_s", "steal_s"))])
    print(f"\nmedians of {args.rounds} rounds; load average {C.load_average()}")
    print(C.markdown_table(["inputs", "wall (s)", "user (s)", "system (s)", "kernel threads' user (s)", "steal (s)"],
                           rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
