"""Entry point for `ray job submit ... -- python -m mergescale.cluster.job {merge,eval,train} ...`.

Inside a Ray job the driver connects to the cluster it was submitted to (address "auto" unless --address is
given). Each subcommand takes exactly the arguments of the matching `mergescale` CLI command, so a job is the
CLI command with the cluster already there. Models, data and outputs must be on storage every node mounts.

    python -m mergescale.cluster.job merge CONFIG [--out DIR] [--workers K]
    python -m mergescale.cluster.job eval MODEL_DIR --tasks held-out --replicas K --out DIR
    python -m mergescale.cluster.job train expert CONFIG [--out DIR] [--workers N]
    python -m mergescale.cluster.job study run CONFIG          # also: study plan CONFIG, study status RUN_DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys


def _merge(argv: list[str]) -> int:
    from mergescale.cluster.merge import run_distributed_merge

    p = argparse.ArgumentParser(prog="python -m mergescale.cluster.job merge")
    p.add_argument("config")
    p.add_argument("--out", help="output directory (overrides the config's 'out'); must be on shared storage")
    p.add_argument("--workers", type=int, help="number of merge actors (default: cluster.workers in the config)")
    p.add_argument("--address", default="auto", help="Ray address (default: the cluster running this job)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    manifest = run_distributed_merge(args.config, args.out, workers=args.workers, address=args.address,
                                     overwrite=args.overwrite, progress=True)
    print(json.dumps({"outputs": manifest["outputs"], "timing": manifest["timing"]}, indent=2))
    return 0


def _from_cli(module: str, name: str):
    """A job subcommand from a subpackage's CLI module (its add_arguments + run), defaulting to address auto."""

    def main(argv: list[str]) -> int:
        cli = importlib.import_module(module)
        p = argparse.ArgumentParser(prog=f"python -m mergescale.cluster.job {name}")
        cli.add_arguments(p)
        args = p.parse_args(argv)
        if getattr(args, "address", "") is None:
            args.address = "auto"  # inside `ray job submit`: the cluster this job runs on
        return cli.run(args)

    return main


COMMANDS = {
    "merge": _merge,
    "eval": _from_cli("mergescale.eval.cli", "eval"),
    "train": _from_cli("mergescale.training.cli", "train"),
    "study": _from_cli("mergescale.study.cli", "study"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m mergescale.cluster.job {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mergescale.checkpoint.read import CheckpointError
    from mergescale.config import ConfigError
    from mergescale.errors import MergeInputError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, MergeInputError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
