"""What reading the inputs from the disk costs the merge's compute: a CPU-bound loop's speed alone, then while
another thread reads the benchmark's expert checkpoints as the merge does (mapped, every page faulted in), from
the page cache (warm), then from the disk (cold), then from the disk through Python's mmap.madvise, as mergescale
read before 2026-11-24: that call holds the GIL while the pages it populates come from the disk, so every other
Python thread of the process waits, here the loop between its numpy calls.

    PYTHONPATH=. .venv/bin/python benchmarks/read_cost.py                 # the 1 GB checkpoints, 3 rounds
    PYTHONPATH=. .venv/bin/python benchmarks/read_cost.py --rounds 5

The checkpoints are those of benchmarks/merge_single.py (generated there if missing). The loop is numpy on one
thread over a 32 MB array (4x the L3 cache: memory traffic, as the merge kernels). "cold" evicts the files first
(_common.drop_page_cache). The machine-wide CPU time while each read runs comes from /proc/stat, in seconds:
system time and steal (time the hypervisor ran something else on our virtual CPUs) are what the read itself costs.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FIELDS = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]


def cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:1 + len(FIELDS)]]


def madvise_holding_the_gil(mapped, advice: int) -> int:
    """checkpoint._madvise as it was before 2026-11-24: Python's mmap.madvise, which holds the GIL during the call."""
    try:
        mapped.base.obj.madvise(advice)  # np.frombuffer(mm).base is a memoryview of the mmap
        return 0
    except OSError as e:
        return e.errno


def read_all(paths: list[Path], hold_gil: bool) -> tuple[int, float]:
    """Every tensor mapped and its pages faulted in, as the merge reads (`read: mmap`, Checkpoint.map_bytes)."""
    from mergescale.checkpoint import read as checkpoint

    own = checkpoint._madvise
    checkpoint._madvise = madvise_holding_the_gil if hold_gil else own
    try:
        t0, n = time.perf_counter(), 0
        for p in paths:
            ck = checkpoint.Checkpoint(p)
            for info in ck.tensors.values():
                n += ck.map_bytes(info.name, 0, info.rows).nbytes
            ck.close()
        return n, time.perf_counter() - t0
    finally:
        checkpoint._madvise = own


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-mb", type=float, default=1000)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    import os

    import numpy as np

    paths = C.make_checkpoints(args.model_mb, args.experts)["experts"]
    a = np.random.default_rng(0).random(8 * 2**20, dtype=np.float32)
    hz = os.sysconf("SC_CLK_TCK")

    def loop_rate(stop) -> float:
        n, t0 = 0, time.perf_counter()
        while not stop():
            np.sqrt(a, out=a)
            np.square(a, out=a)
            n += 1
        return n / (time.perf_counter() - t0)

    print(f"{len(paths)} experts; load average {C.load_average()}")
    rows = []
    for r in range(args.rounds):
        deadline = time.perf_counter() + 3.0
        rows.append([str(r + 1), "none", f"{loop_rate(lambda: time.perf_counter() > deadline):.2f}", "-", "-", "-",
                     "-"])
        for mode in ("warm", "cold", "cold, mmap.madvise"):
            if mode.startswith("cold"):
                C.drop_page_cache(paths)
            else:
                C.warm_page_cache(paths)
            got: dict = {}
            t0 = cpu_times()
            th = threading.Thread(target=lambda: got.update(r=read_all(paths, hold_gil="mmap" in mode)))
            th.start()
            rate = loop_rate(lambda: not th.is_alive())
            th.join()
            d = dict(zip(FIELDS, (y - x for x, y in zip(t0, cpu_times()))))
            n, secs = got["r"]
            rows.append([str(r + 1), mode, f"{rate:.2f}", f"{n / secs / 1e9:.2f}", f"{secs:.2f}",
                         f"{(d['system'] + d['softirq'] + d['irq']) / hz:.2f}", f"{d['steal'] / hz:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    print()
    print(C.markdown_table(["round", "read beside the loop", "loop iterations/s", "read GB/s", "read s",
                            "system CPU-s (all CPUs)", "steal CPU-s"], rows))
    print(f"\nload average {C.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
