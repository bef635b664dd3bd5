"""What a fresh node or install pays before its first merge: numba compiling the fused kernels.

    git worktree add /tmp/old <commit>
    PYTHONPATH=. .venv/bin/python benchmarks/compile_time.py --checkouts /tmp/old .

For each checkout and method, copies that checkout's `mergescale/` to an empty temporary directory (so numba's
on-disk cache, kept next to the module, starts empty) and, in one fresh process, warms the method's kernels
(`kernels.warm_up`: the merge kernel and, for TIES, the threshold-finding ones, bf16 tiles) for each expert count
in turn, as a merge of the study's grid (2, 4, 6, 8 experts) on a new node would. Prints seconds per expert count
and in all; `--write-doc` puts the table in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = """
import json, sys, time
from mergescale.merge import kernels
method, counts = sys.argv[1], [int(n) for n in sys.argv[2].split(",")]
times = []
for n in counts:
    t0 = time.perf_counter()
    kernels.warm_up(n, "BF16", methods=[method])
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def compile_times(checkout: Path, method: str, counts: list[int]) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="ms-compile-") as tmp:
        shutil.copytree(checkout / "mergescale", Path(tmp) / "mergescale",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")} | {"PYTHONPATH": tmp}
        out = subprocess.run([sys.executable, "-c", CHILD, method, ",".join(map(str, counts))], cwd=tmp, env=env,
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def label(checkout: Path) -> str:
    got = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"], capture_output=True,
                         text=True)
    return got.stdout.strip() or str(checkout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkouts", nargs="+", default=["."], help="repository roots to compare (first: before)")
    ap.add_argument("--methods", nargs="+", default=["average", "task_arithmetic", "ties"])
    ap.add_argument("--experts", nargs="+", type=int, default=[2, 4, 6, 8])
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args()
    load_start = C.load_average()
    print(f"load average {load_start}")
    rows = []
    for method in args.methods:
        for co in args.checkouts:
            checkout = Path(co).resolve()
            times = compile_times(checkout, method, args.experts)
            rows.append([method, label(checkout)] + [f"{t:.1f}" for t in times] + [f"{sum(times):.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["method", "checkout"] + [f"{n} experts (s)" for n in args.experts] + ["total (s)"]
    table = C.markdown_table(header, rows)
    print(table)
    if args.write_doc:
        cmd = "PYTHONPATH=. .venv/bin/python benchmarks/compile_time.py " + " ".join(sys.argv[1:])
        body = f"""Command: `{cmd}`

Machine: {C.machine_line()}; shared (load average {load_start} at the start, {C.load_average()} at the end).

What the first merge on a fresh node (a new pod, a new install, a `ray job submit` working directory, a clean CI
clone) pays before merging: numba compiling the fused kernels, which it then keeps in its on-disk cache next to the
module. Each row is one fresh process on an empty cache warming one method's kernels (`kernels.warm_up`, bf16
tiles; TIES includes its threshold-finding kernels) for each expert count in turn, as a grid over the study's
expert counts would.

{table}
"""
        C.replace_section(C.ROOT / "docs" / "BENCHMARKS.md", "Kernel compilation on a fresh node", body, C.DOC_INTRO)
        print("updated docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
