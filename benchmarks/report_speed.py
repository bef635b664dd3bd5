"""How long `write_report` takes on a study of the paper's size: 2 kinds x 4 sizes x 4 methods x N in {2, 4, 6, 8} x 3
seeds = 384 merged cells and 96 Multitask pseudo-cells, every held-in and held-out task of the registry, a few hundred
examples per task (the per-example files of a real run), 1,000 bootstrap replicates.

    PYTHONPATH=. .venv/bin/python benchmarks/report_speed.py [--examples 300] [--write-doc]

The synthetic run directory (mergescale.study.synthetic, the paper's Tables 1-4 as its aggregates) is cached under
.bench/; each phase is timed in this process, then the whole write_report once more.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from mergescale.study import bootstrap  # noqa: E402
from mergescale.study.figures import render_figures  # noqa: E402
from mergescale.study.findings import evaluate_findings  # noqa: E402
from mergescale.study.ledger import read_ledger  # noqa: E402
from mergescale.study.report import write_report  # noqa: E402
from mergescale.study.summary import load_summary  # noqa: E402
from mergescale.study.synthetic import PAPER_BASES, PAPER_METHODS, paper_value, write_synthetic_run  # noqa: E402
from mergescale.study.tables import build_tables  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300, help="examples per task")
    ap.add_argument("--write-doc", action="store_true", help="put the table in docs/BENCHMARKS.md")
    args = ap.parse_args()

    run = C.BENCH / f"report-run-{args.examples}"
    if not (run / "ledger.parquet").exists():
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthetic_run(run, paper_value(), bases=PAPER_BASES, methods=PAPER_METHODS, num_experts=[2, 4, 6, 8],
                            seeds=[0, 1, 2], discrete=True, n_examples=args.examples)
        print(f"built {run} in {time.perf_counter() - t0:.1f} s")
    rows = read_ledger(run)
    n_files = len({r[p] for r in rows for p in ("examples_path", "reference_examples_path")})
    cells = len({(r["base"], r["method"], r["n_experts"], r["seed"]) for r in rows})

    phases = []

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        phases.append((name, time.perf_counter() - t0, time.process_time() - c0))
        return out

    summary = timed("ledger, cells and aggregation (no bootstrap)", lambda: load_summary(run, n_boot=0))
    timed(f"bootstrap: read {n_files} per-example files, {bootstrap.N_BOOT} replicates of {len(rows)} rows",
          lambda: bootstrap.row_replicates(rows, run, bootstrap.N_BOOT).shape)
    timed("tables and findings", lambda: (build_tables(summary), evaluate_findings(summary)))
    made, _ = timed("figures (6 PNG)", lambda: render_figures(summary))
    timed("write_report, end to end", lambda: write_report(run))

    table = C.markdown_table(["phase", "wall s", "CPU s (all threads)"],
                             [[name, f"{w:.2f}", f"{c:.2f}"] for name, w, c in phases])
    body = (f"Command: `PYTHONPATH=. .venv/bin/python benchmarks/report_speed.py --examples {args.examples}`\n\n"
            f"Machine: {C.machine_line()}; load average {C.load_average()}. Ledger: {cells} cells (384 merges and 96 "
            f"Multitask pseudo-cells), {len(rows)} rows, {args.examples} examples per task.\n\n{table}\n")
    print(body)
    if args.write_doc:
        C.replace_section(C.ROOT / "docs" / "BENCHMARKS.md", "Study report", body, C.DOC_INTRO)


if __name__ == "__main__":
    main()
