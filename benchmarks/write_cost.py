"""CPU and wall time of writing a new file through the page cache vs with O_DIRECT (checkpoint/direct_io.py).

    PYTHONPATH=. .venv/bin/python benchmarks/write_cost.py              # 1 GB, 3 rounds, in .bench/
    PYTHONPATH=. .venv/bin/python benchmarks/write_cost.py --gb 4 --rounds 2

Each round writes the same random 64 MB buffer over and over into a fresh file, once with buffered `pwrite` (as
the merge's writer does with `write: buffered`) and once through `DirectStream` (`write: direct`), then fsyncs,
alternating so the disk's drift hits both. CPU is this process's (user + system) during the writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def write_file(path: Path, buf: bytes, total: int, direct: bool) -> dict:
    from mergescale.checkpoint.direct_io import open_stream, pwrite_all

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    stream = open_stream(path, fd) if direct else None
    if direct and stream is None:
        raise SystemExit(f"{path.parent}: no O_DIRECT on this file system")
    t0, c0 = time.perf_counter(), time.process_time()
    for off in range(0, total, len(buf)):
        if stream is not None:
            stream.write(off, buf)
        else:
            pwrite_all(fd, buf, off)
    if stream is not None:
        stream.close()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    t1 = time.perf_counter()
    os.fsync(fd)
    fsync = time.perf_counter() - t1
    os.close(fd)
    path.unlink()
    return {"wall": wall, "cpu": cpu, "fsync": fsync}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    buf = os.urandom(64 << 20)
    total = int(args.gb * 2**30) // len(buf) * len(buf)
    C.BENCH.mkdir(exist_ok=True)
    rows = []
    print(f"{C.machine_line()}; load average {C.load_average()}")
    for r in range(args.rounds):
        for direct in (False, True):
            res = write_file(C.BENCH / "write_cost.bin", buf, total, direct)
            rows.append([r + 1, "O_DIRECT (DirectStream)" if direct else "buffered pwrite", f"{res['wall']:.2f}",
                         f"{res['cpu']:.2f}", f"{res['fsync']:.2f}"])
    print(C.markdown_table(["round", "write", f"write {total / 2**30:g} GiB (s)", "CPU (s)", "then fsync (s)"], rows))
    print(f"load average {C.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
