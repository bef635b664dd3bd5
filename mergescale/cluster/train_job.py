"""`ray job submit ... -- python -m mergescale.cluster.job train RECIPE CONFIG [--out DIR] [--workers N]`.

Runs on the cluster's driver node and connects to the cluster the job was submitted to (address "auto" unless
--address is given). Model, data files, output and checkpoint directories must be on storage every node sees.
`main(argv)` is job.py's `train` subcommand; alone: `python -m mergescale.cluster.train_job RECIPE CONFIG`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from mergescale.training.cli import add_arguments, run

    p = argparse.ArgumentParser(prog="mergescale.cluster.job train", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    if args.address is None:
        args.address = "auto"  # inside `ray job submit`: the cluster this job runs on
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
