"""A study's cells by push vs via disk: the same tiny study (2 bases, 4 categories, 2 methods, N in {2, 4}, 2 seeds,
no training) run twice by `mergescale study run`, once with `merge.push: never` (each cell's merge written, then
loaded by its evaluation) and once by push (each base loaded once by a resident replica; every cell merged into it
and scored there); with --actors K a third run pushes from K Ray merge actors (merge.workers) into the replicas.
Reports, for the cells' part of each run (from the first cell's merge to the last cell's score):
cells per hour, merged bytes written, model loads; and checks the two ledgers hold the same scores.

    PYTHONPATH=. .venv/bin/python benchmarks/study_push.py [--root DIR] [--examples 16] [--push | --disk] [--actors K]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

LABELS = {"disk": "via disk", "push": "by push (merged in the replica)", "actors": "by push from {k} merge actors"}


def run_study(cfg: dict, root: Path, mode: str, actors: int = 2) -> dict:
    merge = {**cfg.get("merge", {}), "push": "never" if mode == "disk" else "auto"}
    cfg = {**cfg, "name": f"push-bench-{mode}", "work_dir": str(root / mode), "merge": merge}
    if mode == "actors":  # the cell's merge on Ray actors that send their rows to the replica; half a CPU each for
        # them and the two replicas, so that both replicas and one merge's actors fit on a 2-core machine's Ray
        merge.update(workers=actors, num_cpus=0.5)
        cfg["eval"] = {**cfg.get("eval", {}), "num_cpus": 0.5}
    path = root / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "mergescale.cli", "study", "run", str(path), "--no-report", "-q"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} study failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    run_dir = Path(cfg["work_dir"])
    events = [json.loads(x) for x in (run_dir / "timings.jsonl").read_text().splitlines()]
    refs = {p.stem for p in (run_dir / "references").glob("*.parquet")}
    cell_events = [e for e in events if e["kind"] == "merge" or (e["kind"] == "eval" and e["key"] not in refs)]
    manifests = [json.loads(p.read_text()) for p in (run_dir / "manifests").glob("*.json")]
    cells = len(json.loads((run_dir / "plan.json").read_text())["cells"])
    span = max(e["end"] for e in cell_events) - min(e["start"] for e in cell_events)
    residents = [e for e in events if e["kind"] == "residents"]
    import pyarrow.parquet as pq

    return {"mode": mode, "cells": cells, "merges": len(manifests), "cells_s": span, "process_s": time.time() - t0,
            "bytes_written": sum(m["plan"]["bytes_written"] for m in manifests if "pushed" not in m),
            "model_loads": residents[0]["started"] if residents else sum(e["kind"] == "eval" and e["key"] not in refs
                                                                          for e in events),
            "scores": {(r["base"], r["method"], r["n_experts"], r["seed"], r["task"]): r["score"]
                       for r in pq.read_table(run_dir / "ledger.parquet").to_pylist()}}


def paper_estimate(merges: int = 384, model_gb: float = 128.0, nodes: int = 8, read_gbs: float = 2.0,
                   write_gbs: float = 1.0, load_min: float = 10.0) -> str:
    """The 64B x 8-expert grid on paper, with the README's bandwidth model: via disk each cell writes its merge
    (model_gb / (nodes x W)) and its evaluation reads it back on one replica's node (model_gb / R) and starts an
    engine on it (load_min, the vLLM start-up lm-eval users report per model)."""
    written_tb = merges * model_gb / 1000
    write_s = model_gb / (nodes * write_gbs)
    read_s = model_gb / read_gbs
    io_h = merges * (write_s + read_s) / 3600
    loads_h = merges * load_min / 60
    return (f"{merges} merges x {model_gb:.0f} GB: {written_tb:.1f} TB written and {written_tb:.1f} TB read back via "
            f"disk; per cell {write_s:.0f} s to write ({nodes} nodes x {write_gbs:g} GB/s) + {read_s:.0f} s to read "
            f"back ({read_gbs:g} GB/s) = {io_h:.1f} h of I/O over the grid, plus {merges} engine loads "
            f"({loads_h:.0f} h at {load_min:g} min each). By push: 0 bytes written, one load per base and replica.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--examples", type=int, default=16, help="fixture examples per task")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--push", action="store_true", help="only the push run")
    only.add_argument("--disk", action="store_true", help="only the disk run")
    ap.add_argument("--actors", type=int, default=0, help="also a push run whose merges run on K Ray merge actors")
    args = ap.parse_args()
    from mergescale.tiny import build_study_fixture

    root = Path(args.root or tempfile.mkdtemp(prefix="study-push-bench-"))
    try:
        cfg = build_study_fixture(root / "fixture", n_examples=args.examples)
        modes = ["push"] if args.push else ["disk"] if args.disk else ["disk", "push"]
        modes += ["actors"] if args.actors else []
        runs = [run_study(cfg, root, m, args.actors) for m in modes]
        print(f"Machine: {_common.machine_line()}; load average {_common.load_average()}")
        print(f"tiny study, {runs[0]['cells']} cells ({runs[0]['merges']} distinct merges), {args.examples} "
              "examples per task\n")
        print("| cells | cells' wall time (s) | cells per hour | merged bytes written | model loads for the cells |")
        print("|---|---:|---:|---:|---:|")
        for r in runs:
            print(f"| {LABELS[r['mode']].format(k=args.actors)} | {r['cells_s']:.1f} | "
                  f"{3600 * r['cells'] / r['cells_s']:.0f} | {r['bytes_written'] / 1e6:.1f} MB | {r['model_loads']} |")
        for r in runs[2:]:  # the actors' ledger against the disk run's
            if r["scores"] != runs[0]["scores"]:
                sys.exit(f"the {r['mode']} and disk ledgers differ")
            print(f"\n{LABELS[r['mode']].format(k=args.actors)}: ledger's scores equal the disk run's: True")
        if len(runs) >= 2:
            same = runs[0]["scores"] == runs[1]["scores"]
            print(f"\nmodel loads avoided: {runs[0]['model_loads'] - runs[1]['model_loads']}; speed-up of the cells: "
                  f"{runs[0]['cells_s'] / runs[1]['cells_s']:.2f}x; ledgers' scores equal: {same}")
            if not same:
                sys.exit("the push and disk ledgers differ")
        print("\non paper (64B x 8 experts): " + paper_estimate())
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
