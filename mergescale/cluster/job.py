"""Entry point for `ray job submit ... -- python -m mergescale.cluster.job {merge,eval,train} ...`.

Inside a Ray job the driver connects to the cluster it was submitted to (address "auto"); the same config files
as the CLI are used, so a job is the CLI command with the cluster already there.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"merge": _merge}
    # eval / train register through their own job modules when present.
    for name, module in (("eval", "mergescale.cluster.eval_job"), ("train", "mergescale.cluster.train_job")):
        if importlib.util.find_spec(module) is not None:
            commands[name] = importlib.import_module(module).main
    if not argv or argv[0] not in commands:
        print(f"usage: python -m mergescale.cluster.job {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    from mergescale.config import ConfigError
    from mergescale.merge.checkpoint import CheckpointError
    from mergescale.merge.inputs import MergeInputError

    try:
        return commands[argv[0]](argv[1:])
    except (ConfigError, MergeInputError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
