"""`mergescale train expert|multitask|instruct CONFIG`: fine-tune on Ray Train with DeepSpeed ZeRO.

Without --address (or cluster.address in the config) an embedded local Ray is started for the run.
"""

from __future__ import annotations

import argparse

from mergescale.training.config import RECIPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", choices=RECIPES, help="expert: one task category; multitask: held-in mixture; "
                   "instruct: an instruction mixture (refused if an evaluation task leaks into it)")
    p.add_argument("config", help="train config YAML (see configs/train/)")
    p.add_argument("--out", help="output model directory (overrides 'out' in the config)")
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides cluster.workers)")
    p.add_argument("--address", help="Ray address (auto, ray://host:port); default: an embedded local Ray")
    p.add_argument("--data-dir", help="offline data: DIR/<task>/<split>.parquet|jsonl|json|arrow (overrides data_dir)")
    p.add_argument("--tasks-yaml", action="append", default=[],
                   help="task YAML file(s) to register (added to the config's task_files), e.g. DATA_DIR/tasks.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-resume", action="store_true", help="discard checkpoints of an interrupted run of this config")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DeepSpeed checkpoints after success")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    import sys

    from mergescale.training import train
    from mergescale.training.api import TrainingFailed

    try:
        m = train(args.recipe, args.config, out=args.out, overwrite=args.overwrite, resume=not args.no_resume,
                  progress=not args.quiet, workers=args.workers, address=args.address,
                  keep_checkpoints=args.keep_checkpoints, data_dir=args.data_dir, task_files=args.tasks_yaml)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    final = m["final"]
    val = f", val loss {final['val_loss']:.4f}" if final["val_loss"] is not None else ""
    print(f"wrote {m['config']['out']}: {m['recipe']} model, {m['steps']} steps, "
          f"train loss {final['train_loss']:.4f}{val}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train",
                              help="fine-tune an expert, multitask or instruction-tuned model (DeepSpeed ZeRO on Ray)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
