"""Where a study's wall time goes: the tiny study (2 bases, 4 categories, 2 methods, N in {2, 4}, 2 seeds; one
expert and one multitask model trained by the study) run from scratch by `mergescale study run`, its wall time split
into training, reference evaluations, the resident replicas' loads of their base (cells by push), merges, cell
evaluations and orchestration overhead.

Overhead is the run's wall time (from `study.run`'s start to its end, as logged in RUN_DIR/timings.jsonl) during
which no training, evaluation or merge was executing: planning, Ray start, content digests, scheduling gaps, Ray
worker start-up, ledger writes. An evaluation's span starts with its setup in the worker (importing transformers,
registering custom tasks), as a resident replica's load does; the overhead with that setup counted as overhead
instead (as the first three passes in docs/BENCHMARKS.md counted it) is printed too. Busy times overlap (a merge
and an evaluation run side by side), so the phases are reported as wall-clock spans of each kind plus the union of
all of them.

    PYTHONPATH=. .venv/bin/python benchmarks/study_tiny.py [--root DIR] [--examples 16] [--address ADDR]
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


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--examples", type=int, default=16, help="fixture examples per task")
    ap.add_argument("--address", help="a running Ray to use (default: the study's embedded local Ray)")
    args = ap.parse_args()
    from mergescale.study.plan import make_plan
    from mergescale.tiny import build_study_fixture

    root = Path(args.root or tempfile.mkdtemp(prefix="study-bench-"))
    try:
        cfg = build_study_fixture(root, n_examples=args.examples, trained={"tiny-it": ["sentiment"]},
                                  multitask=("tiny-it",))
        path = root / "study.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        plan = make_plan(path)
        planned_evals = len(plan.references()) + len(plan.unique_merges())
        t0 = time.time()
        address = ["--address", args.address] if args.address else []
        r = subprocess.run([sys.executable, "-m", "mergescale.cli", "study", "run", str(path), "--no-report", "-q",
                            *address], capture_output=True, text=True)
        process_wall = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"study failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        events = [json.loads(x) for x in (Path(cfg["work_dir"]) / "timings.jsonl").read_text().splitlines()]
        run = next(e for e in events if e["kind"] == "run")
        wall = run["end"] - run["start"]
        kinds = {"train": "training", "ref": "reference evaluations", "replica_load": "resident replicas' base loads",
                 "merge": "merges", "cell": "cell evaluations"}
        ref_keys = {p.stem for p in (Path(cfg["work_dir"]) / "references").glob("*.parquet")}
        spans: dict[str, list] = {k: [] for k in kinds}
        setup_excluded = []  # every span, the evaluations' from the end of their setup
        for e in events:
            if e["kind"] == "eval":
                spans["ref" if e["key"] in ref_keys else "cell"].append((e["start"], e["end"]))
                setup_excluded.append((e["start"] + e.get("setup_s", 0.0), e["end"]))
            elif e["kind"] in spans:
                spans[e["kind"]].append((e["start"], e["end"]))
                setup_excluded.append((e["start"], e["end"]))
        busy = union([iv for v in spans.values() for iv in v])
        busy_without_setup = union(setup_excluded)
        print(f"tiny study: {len(plan.cells)} cells, {len(plan.unique_merges())} merges, "
              f"{len(plan.references())} reference models, {len(plan.trainings())} trainings; "
              f"{args.examples} examples per task")
        print(f"evaluations run: {len(spans['ref']) + len(spans['cell'])} (plan: {planned_evals}); merges run: "
              f"{len(spans['merge'])} (plan: {len(plan.unique_merges())})\n")
        print("| part | wall-clock span (s) | share of the run | tasks | busy, summed over tasks (s) |")
        print("|---|---:|---:|---:|---:|")
        for k, label in kinds.items():
            u = union(spans[k])
            print(f"| {label} | {u:.1f} | {100 * u / wall:.0f}% | {len(spans[k])} | "
                  f"{sum(e - s for s, e in spans[k]):.1f} |")
        print(f"| any of the above (union) | {busy:.1f} | {100 * busy / wall:.0f}% | | |")
        print(f"| **orchestration overhead** (run wall - union) | {wall - busy:.1f} | "
              f"{100 * (wall - busy) / wall:.0f}% | | |")
        print(f"| overhead with the evaluations' setup counted in it | {wall - busy_without_setup:.1f} | "
              f"{100 * (wall - busy_without_setup) / wall:.0f}% | | |")
        print(f"| `study.run` wall | {wall:.1f} | 100% | | |")
        print(f"| process wall (Python start, imports, Ray start, run) | {process_wall:.1f} | | | |")
        marks = {e["kind"]: e["end"] - run["start"] for e in events if e["kind"] in ("plan", "ray_ready")}
        first = min(s for v in spans.values() for s, _ in v) - run["start"]
        busy_until, gaps = 0.0, []  # stretches of the run with nothing executing, longer than a second
        for s, e in sorted(iv for v in spans.values() for iv in v):
            if s - run["start"] > busy_until + 1.0:
                gaps.append(f"{busy_until:.1f}-{s - run['start']:.1f} s")
            busy_until = max(busy_until, e - run["start"])
        print(f"\nstart: plan checked at {marks.get('plan', float('nan')):.1f} s, Ray ready at "
              f"{marks.get('ray_ready', float('nan')):.1f} s (started once the plan holds), "
              f"first task at {first:.1f} s; "
              f"idle stretches over 1 s: {', '.join(gaps) or 'none'}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
