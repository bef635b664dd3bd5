"""`mergescale study plan|run|status|report`: the paper's grid as one command (registered by mergescale/cli.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="study_command", required=True)
    pl = sub.add_parser("plan", help="validate a study config and print what it will run and cost")
    pl.add_argument("config", help="study config YAML (see configs/study/)")
    r = sub.add_parser("run", help="run (or resume, or grow) a study")
    r.add_argument("config", help="study config YAML (see configs/study/)")
    r.add_argument("--address", help="Ray cluster address (auto, ray://host:port); default: an embedded local Ray")
    r.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    s = sub.add_parser("status", help="done, running, failed and pending cells of a study run directory")
    s.add_argument("run_dir", help="the study's work_dir")
    rep = sub.add_parser("report", help="write the report (tables, figures, findings) of a study run directory")
    rep.add_argument("run_dir", help="the study's work_dir")
    rep.add_argument("--out", help="report directory (default: RUN_DIR/report)")


def run(args) -> int:
    from mergescale.config import ConfigError
    from mergescale.study.ledger import StudyError

    try:
        return COMMANDS[args.study_command](args)
    except (ConfigError, StudyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _plan(args) -> int:
    from mergescale.study.plan import make_plan, measured_rates

    plan = make_plan(args.config)
    print(plan.describe(measured_rates(plan.run)))
    return 0


def _run(args) -> int:
    from mergescale.study import run as run_study

    out = run_study(args.config, address=args.address, progress=not args.quiet, report=not args.no_report)
    print(f"study: {out['done']} of {out['cells']} cells done, {out['failed']} failed; ledger {out['ledger']}")
    if out["report"]:
        print(f"report: {out['report']['html']} (and {out['report']['markdown']})")
    return 1 if out["failed"] else 0


def _status(args) -> int:
    from mergescale.study.ledger import status

    st = status(args.run_dir)
    n = sum(len(st[k]) for k in ("done", "failed", "running", "pending"))
    print(f"{args.run_dir}: {n} cells: {len(st['done'])} done, {len(st['running'])} running, {len(st['failed'])} "
          f"failed, {len(st['pending'])} pending (study driver {'running' if st['driver_alive'] else 'not running'})")
    for c in st["running"]:
        mins = (time.time() - c["since"]) / 60
        what = "interrupted in its" if c["interrupted"] else "in its"
        print(f"  running  {c['cell']}  {what} {c['stage']} ({mins:.1f} min)")
    for c in st["failed"]:
        print(f"  failed   {c['cell']}  in its {c['stage']}: {c['error'].splitlines()[0][:200]}")
    for c in st["pending"][:20]:
        print(f"  pending  {c['cell']}")
    if len(st["pending"]) > 20:
        print(f"  ... and {len(st['pending']) - 20} more pending")
    return 0


def _report(args) -> int:
    from mergescale.study.report import write_report

    paths = write_report(args.run_dir, args.out)
    print(f"report: {paths['html']} (and {paths['markdown']}); {len(paths['tables'])} tables and "
          f"{len(paths['figures'])} figures in {Path(paths['html']).parent}")
    return 0


COMMANDS = {"plan": _plan, "run": _run, "status": _status, "report": _report}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="run the paper's grid: train, merge, evaluate, ledger and report",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
