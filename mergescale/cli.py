"""`mergescale` command line: merge, demo (and the eval / train commands their subpackages register)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from mergescale.config import ConfigError


def _merge(args) -> int:
    from mergescale import api
    from mergescale.config import load_config, with_cluster

    config = with_cluster(load_config(args.config), workers=args.workers)  # checked even for a dry run
    if args.dry_run:
        print(api.merge(config, args.out, overwrite=args.overwrite, dry_run=True)["description"])
        return 0
    manifest = api.merge(config, args.out, workers=args.workers, address=args.address, overwrite=args.overwrite,
                         progress=not args.quiet)
    out = manifest.get("out") or args.out or manifest["config"].get("out")
    total = sum(s["size"] for s in manifest["outputs"].values()) if "outputs" in manifest else 0
    print(f"wrote {out}: {len(manifest.get('outputs', {}))} shard(s), {total / 1e6:.1f} MB, "
          f"{manifest['timing']['total_s']:.1f} s")
    return 0


def _demo(args) -> int:
    from mergescale.demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergescale", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge expert checkpoints as a YAML config describes")
    m.add_argument("config", help="merge config YAML (see configs/)")
    m.add_argument("--out", help="output model directory (overrides 'out' in the config)")
    m.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    m.add_argument("--workers", type=int, help="merge on K Ray actors (default: this process only)")
    m.add_argument("--address", help="Ray cluster address (auto, or ray://host:port); none: an embedded local Ray")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    m.set_defaults(func=_merge)

    d = sub.add_parser("demo", help="build small local checkpoints and merge them with every method")
    d.add_argument("--out", default="mergescale-demo", help="directory for the demo models and merges")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=_demo)

    # Subpackages that have a command line register it here (mergescale/<pkg>/cli.py: add_parser(sub)).
    for module in ("mergescale.eval.cli", "mergescale.training.cli", "mergescale.study.cli", "mergescale.models.cli",
                   "mergescale.data.cli"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from mergescale.checkpoint.read import CheckpointError
    from mergescale.data.packages import DataBuildError
    from mergescale.errors import MergeInputError
    from mergescale.models.gguf_import import ModelImportError

    try:
        return args.func(args)
    except (ConfigError, MergeInputError, CheckpointError, FileExistsError, ModelImportError, DataBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
