"""Small synthetic data files in each task's schema, for tests and the demo (no hub access).

Each task YAML carries a `fixture` recipe describing one row: `text` (a random sentence), `word`, `id`
(a unique string), `index` (the row number), `{int: [lo, hi]}`, `{one_of: [...]}`, `{pick: FIELD}` (an element
of an earlier list field), `{span: FIELD}` (a few consecutive words of an earlier text field), and nested
mappings / lists of these.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mergescale.eval.tasks import Task, TaskError, get_task, tasks_for

WORDS = ("the movie was great terrible and i loved hated it team won final match company reported record profits "
         "researchers found new species of frog man broke his toe hammer foot question answer paris capital france "
         "sports business science news positive negative yes no maybe true false").split()


def _gen(spec, rng: random.Random, row: dict, index: int):
    if isinstance(spec, str):
        if spec == "text":
            return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "."
        if spec == "word":
            return rng.choice(WORDS)
        if spec == "id":
            return f"ex{index:06d}"
        if spec == "index":
            return index
        return spec  # a literal string
    if isinstance(spec, list):
        return [_gen(s, rng, row, index) for s in spec]
    if isinstance(spec, dict) and len(spec) == 1:
        (k, v), = spec.items()
        if k == "int":
            return rng.randint(v[0], v[1])
        if k == "one_of":
            return rng.choice(v)
        if k == "pick":
            return rng.choice(row[v])
        if k == "span":
            words = row[v].rstrip(".").split()
            i = rng.randrange(len(words))
            return " ".join(words[i:i + rng.randint(1, 3)])
    if isinstance(spec, dict):
        out: dict = {}
        for k, v in spec.items():
            out[k] = _gen(v, rng, {**row, **out}, index)
        return out
    return spec


def fixture_rows(task: Task, n: int = 8, seed: int = 0) -> list[dict]:
    if not task.fixture:
        raise TaskError(f"task {task.name!r} has no `fixture` recipe in {task.source}")
    rng = random.Random(f"{task.name}:{seed}")
    return [_gen(task.fixture, rng, {}, i) for i in range(n)]


def write_fixture_data(data_dir: str | Path, tasks="all", n: int = 8, seed: int = 0, splits=("eval", "train")) -> Path:
    """Write DATA_DIR/<task>/<split>.jsonl (each part of a "+" split) for the selected tasks; returns data_dir."""
    data_dir = Path(data_dir)
    chosen = tasks_for(tasks) if isinstance(tasks, str) else [t if isinstance(t, Task) else get_task(t) for t in tasks]
    for t in chosen:
        names = {t.eval_split if s == "eval" else t.train_split for s in splits} - {None}
        for k, split in enumerate(sorted(names)):
            for j, part in enumerate(split.split("+")):
                rows = fixture_rows(t, n, seed=seed * 1000 + k * 10 + j)
                path = data_dir / t.name / f"{part}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
                tmp.replace(path)
    return data_dir
