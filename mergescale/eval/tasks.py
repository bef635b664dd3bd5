"""Task registry: the paper's held-in / held-out datasets, their T0 prompt templates and metrics.

Public API (stable; the training engine imports it):

    from mergescale.eval.tasks import get_task, tasks_for, Task, Template, PromptedExample

    task = get_task("imdb")                     # TaskError for an unknown name (lists the known ones)
    tasks = tasks_for("held-out,held-in:sentiment,copa")
    # selectors: all | held-in | held-out | held-in:<category> | held-out:<category> | <category> | <task name>
    ds = task.load(task.train_split, data_dir=None)   # a datasets.Dataset; hub when data_dir is None
    for ex in task.prompted(split=task.train_split, data_dir=...):   # PromptedExample, one per scorable row
        ex.input, ex.target                     # a training pair (input text, target text)
        ex.choices, ex.label                    # rank classification: answer strings and the gold index
    r = task.render_rows(ds, split=..., data_dir=...)   # r.examples, and r.unscorable: [(row, why)] to count
    task.templates[0].render(row, example_id="7")   # -> PromptedExample, or None when the row cannot be scored
    task.training_pairs(data_dir=D)             # [(input, target), ...] over task.train_split

A row lacking a column its template reads is a TaskError naming the task, file, row and column (templates.py
applies templates strictly); an empty or unreadable data file is one naming the file.

A task is a YAML entry (mergescale/eval/registry/*.yaml, or your own file: `register_tasks(path)` or the
MERGESCALE_TASKS env var, os.pathsep-separated; a file may set `replace_categories: true`, see register_tasks).
Fields: name, category, group (held_in | held_out | custom), hf_id, hf_config, eval_split, train_split,
data_files ({split: path or [paths]}, Parquet/JSONL/JSON/Arrow, relative to the YAML file), metric (accuracy |
accuracy_norm | rouge_l | exact_match | f1), max_new_tokens, templates (name, jinja "input ||| target",
answer_choices "a ||| b" (may use jinja), references, target_delimiter) and fixture (a synthetic-row recipe,
see fixtures.py). `accuracy` and `accuracy_norm` (HellaSwag's length-normalized accuracy) tasks are scored by
rank classification; the others by greedy generation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import yaml

from mergescale.eval.templates import DataError, PromptedExample, Rendered, TaskError, Template  # noqa: F401 - API

REGISTRY_DIR = Path(__file__).parent / "registry"
METRICS = ("accuracy", "accuracy_norm", "rouge_l", "exact_match", "f1")
RANK_METRICS = ("accuracy", "accuracy_norm")  # accuracy_norm: the choice with the best log-prob per character


def metric_column(metric: str) -> str:
    """A task metric's per-example column (mergescale.eval.runner.example_row): `acc` / `acc_norm` for rank
    classification (metric accuracy / accuracy_norm), the metric's own name for generation metrics."""
    return {"accuracy": "acc", "accuracy_norm": "acc_norm"}.get(metric, metric)
GROUPS = ("held_in", "held_out", "custom")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
@dataclass
class Task:
    name: str
    category: str
    group: str = "custom"
    hf_id: str | None = None
    hf_config: str | None = None
    eval_split: str = "validation"
    train_split: str | None = "train"
    metric: str = "accuracy"
    max_new_tokens: int = 64
    templates: list[Template] = field(default_factory=list)
    data_files: dict[str, list[str]] = field(default_factory=dict)
    fixture: dict | None = None
    source: str = ""  # the YAML file that defined it

    @property
    def scoring(self) -> str:
        return "rank" if self.metric in RANK_METRICS else "generate"

    def template(self, name: str | None = None) -> Template:
        if name is None:
            return self.templates[0]
        for t in self.templates:
            if t.name == name:
                return t
        raise TaskError(f"task {self.name!r} has no template {name!r}; it has: "
                        f"{', '.join(t.name for t in self.templates)}")

    # -- data ---------------------------------------------------------------------------------------------
    def local_files(self, split: str, data_dir: str | Path | None) -> tuple[list[Path], list[Path]]:
        """(found, looked_for) for each part of `split` ("a+b" = concatenation of splits a and b)."""
        found, looked = [], []
        for part in split.split("+"):
            if part in self.data_files:
                paths = [Path(p) for p in self.data_files[part]]
                looked += paths
                found += [p for p in paths if p.exists()]
                continue
            if data_dir is None:
                continue
            base = Path(data_dir) / self.name
            cands = [base / f"{part}{s}" for s in DATA_SUFFIXES]
            looked += cands
            hit = [c for c in cands if c.exists()] or sorted(base.glob(f"{part}-*.parquet"))
            found += hit[:1] if hit and hit[0] in cands else hit
        return found, looked

    def load(self, split: str | None = None, data_dir: str | Path | None = None):
        """The split as a `datasets.Dataset`: local files (data_files, or DATA_DIR/<task>/<split>.<ext>) when
        given, else the Hugging Face Hub. TaskError naming the task and the files looked for when missing."""
        import datasets

        split = split or self.eval_split
        found, looked = self.local_files(split, data_dir)
        if data_dir is not None or self.data_files:
            n_parts = len(split.split("+"))
            if len(found) < n_parts:
                raise TaskError(
                    f"task {self.name!r}: no local data for split {split!r}; looked for "
                    f"{', '.join(str(p) for p in looked) or '(no data_dir given)'}. Provide one Parquet/JSONL/JSON/"
                    f"Arrow file per split part at {Path(data_dir or '.') / self.name}/<split>.parquet (e.g. export "
                    f"`datasets.load_dataset({self.hf_id!r}, {self.hf_config!r}, split=...).to_parquet(...)` on a "
                    "machine with internet), or set data_files in the task YAML."
                )
            parts = [self._read_file(p) for p in found]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if not self.hf_id:
            raise TaskError(f"task {self.name!r}: no hf_id and no data_files; pass data_dir (--data-dir)")
        try:
            ds = datasets.load_dataset(self.hf_id, self.hf_config, split=split)
        except Exception as e:  # noqa: BLE001 - offline, auth, renamed dataset: all mean "provide the files"
            raise TaskError(
                f"task {self.name!r}: loading {self.hf_id} ({self.hf_config}) split {split!r} from the Hugging Face "
                f"Hub failed ({type(e).__name__}: {e}). Offline, pass --data-dir DIR with "
                f"DIR/{self.name}/<split>.parquet|jsonl|json|arrow."
            ) from None
        if len(ds) == 0:
            raise TaskError(f"task {self.name!r}: {self.hf_id} ({self.hf_config}) split {split!r} holds no rows")
        return ds

    def _read_file(self, path: Path):
        """_load_file, its failures (an empty file, a truncated JSONL, a corrupt Parquet) as a TaskError naming
        the file instead of the datasets library's traceback."""
        if path.stat().st_size == 0:
            raise TaskError(f"task {self.name!r}: {path} is empty")
        if path.suffix == ".parquet" and _parquet_rows(path) == 0:  # datasets fails on one with a cryptic error
            raise TaskError(f"task {self.name!r}: {path} holds no rows")
        quiet = logging.getLogger("datasets.packaged_modules")  # it logs the parser's error before raising
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            ds = self._load_file(path)
        except Exception as e:  # noqa: BLE001 - StopIteration, DatasetGenerationError, ArrowInvalid, ...
            while e.__cause__ is not None or e.__context__ is not None:  # the library wraps the parser's error
                e = e.__cause__ or e.__context__
            raise TaskError(f"task {self.name!r}: cannot read {path}: "
                            f"{_bad_json_line(path) or f'{type(e).__name__}: {e}'}") from None
        finally:
            quiet.setLevel(level)
        if len(ds) == 0:
            raise TaskError(f"task {self.name!r}: {path} holds no rows")
        return ds

    @staticmethod
    def _load_file(path: Path):
        import datasets

        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        kind = "parquet" if path.suffix == ".parquet" else "json"
        was_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar per small local file is noise next to the eval's own bar
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        finally:
            if was_on:
                datasets.enable_progress_bars()

    def data_source(self, split: str | None, data_dir) -> str:
        """The split's files (comma-separated), or its Hub dataset."""
        split = split or self.eval_split
        if data_dir is not None or self.data_files:
            return ", ".join(map(str, self.local_files(split, data_dir)[0]))
        return f"{self.hf_id} ({self.hf_config}) split {split!r}"

    def row_origin(self, split: str | None, data_dir, index: int) -> str:
        """Where row `index` of a split comes from: "FILE row K" (K counts from 0 within that file)."""
        split = split or self.eval_split
        found, _ = self.local_files(split, data_dir)
        if not (data_dir is not None or self.data_files) or not found:
            return f"{self.data_source(split, data_dir)} row {index}"
        for path in found[:-1]:  # only a split of several files needs their lengths (read again: errors only)
            n = len(self._load_file(path))
            if index < n:
                break
            index -= n
        else:
            path = found[-1]
        return f"{path} row {index}"

    def render_rows(self, dataset, template: str | None = None, limit: int | None = None, split: str | None = None,
                    data_dir=None, sample_seed: int | None = None) -> Rendered:
        """Prompt the rows of `dataset` (the task's `split`, as loaded from data_dir) in order, up to `limit`
        examples. The example id is the row index within the (concatenated) split, stable across runs on the same
        data. With `limit` and a `sample_seed`, the rows are read in a seeded random order until `limit` examples
        are found, and returned in dataset order: a cap that does not favour whatever the file lists first.
        TaskError naming the task, file, row and column when a row lacks a value the template reads."""
        tpl = self.template(template)
        indexed = enumerate(dataset)
        if limit is not None and sample_seed is not None and limit < len(dataset):
            import numpy as np

            order = np.random.default_rng([sample_seed, len(dataset)]).permutation(len(dataset)).tolist()
            indexed = ((i, dataset[i]) for i in order)
        names = getattr(dataset, "column_names", None)  # a datasets.Dataset; a list of dicts is checked per row
        missing_cols = [c for c in tpl.columns if names is not None and c not in names]
        where = partial(self.row_origin, split, data_dir)
        if missing_cols:
            raise TaskError(f"task {self.name!r}: {self.data_source(split, data_dir)} has no column "
                            f"{', '.join(map(repr, missing_cols))}, which template {tpl.name!r} reads (in any row; its "
                            f"columns: {', '.join(names)})")
        examples, unscorable, rows = [], [], 0
        for i, row in indexed:
            if limit is not None and len(examples) >= limit:
                break
            rows += 1
            try:
                ex = tpl.prompt(row, example_id=str(i))
            except DataError as e:
                raise TaskError(f"task {self.name!r}: {where(i)} {e}") from None
            if isinstance(ex, str):
                unscorable.append((str(i), ex))
            else:
                examples.append(ex)
        examples.sort(key=lambda e: int(e.example_id))
        unscorable.sort(key=lambda u: int(u[0]))
        return Rendered(examples, unscorable, rows)

    def prompted(self, split: str | None = None, data_dir=None, template: str | None = None,
                 limit: int | None = None, dataset=None, sample_seed: int | None = None) -> Iterator[PromptedExample]:
        """Rendered examples in dataset order (rows that cannot be scored are left out: render_rows counts
        them); `sample_seed`: see render_rows."""
        ds = dataset if dataset is not None else self.load(split, data_dir)
        yield from self.render_rows(ds, template, limit, split, data_dir, sample_seed=sample_seed).examples

    def training_pairs(self, data_dir=None, template: str | None = None,
                       limit: int | None = None) -> list[tuple[str, str]]:
        if not self.train_split:
            raise TaskError(f"task {self.name!r} has no train_split")
        return [(e.input, e.target) for e in self.prompted(self.train_split, data_dir, template, limit)]


def _parquet_rows(path: Path) -> int | None:
    """Rows in a Parquet file's footer (None when it has none: datasets then says what is wrong)."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - not Parquet, truncated: reported by the load that follows
        return None


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON Lines file that does not parse, as "line N: why" (None: the file parses)."""
    import json

    if path.suffix not in (".json", ".jsonl"):
        return None
    try:
        with open(path) as f:
            if path.suffix == ".json":
                try:
                    json.load(f)
                    return None
                except json.JSONDecodeError:
                    f.seek(0)
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        return f"line {n} is not valid JSON ({e.msg}; a truncated file?)"
    except (OSError, UnicodeDecodeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# -- registry -------------------------------------------------------------------------------------------------
_TASKS: dict[str, Task] = {}
_LOADED = False


def _as_list(v) -> list[str]:
    return [v] if isinstance(v, (str, Path)) else list(v)


def task_from_dict(d: dict, source: str | Path = "") -> Task:
    d = dict(d)
    where = f"{source}: task {d.get('name')!r}"
    for req in ("name", "category", "templates"):
        if req not in d:
            raise TaskError(f"{where}: missing required field {req!r}")
    allowed = set(Task.__dataclass_fields__) - {"source"}
    unknown = set(d) - allowed
    if unknown:
        raise TaskError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    if d.get("metric", "accuracy") not in METRICS:
        raise TaskError(f"{where}: metric {d['metric']!r} not one of {METRICS}")
    if d.get("group", "custom") not in GROUPS:
        raise TaskError(f"{where}: group {d['group']!r} not one of {GROUPS}")
    try:
        d["templates"] = [Template(**t) for t in d["templates"]]
    except TypeError as e:
        raise TaskError(f"{where}: bad template: {e}") from None
    except Exception as e:  # noqa: BLE001 - jinja syntax errors
        raise TaskError(f"{where}: template does not parse: {e}") from None
    if not d["templates"]:
        raise TaskError(f"{where}: needs at least one template")
    base = Path(source).parent if source else Path(".")
    d["data_files"] = {s: [str(base / p) for p in _as_list(v)] for s, v in (d.get("data_files") or {}).items()}
    if d["templates"][0].answer_choices is None and d.get("metric", "accuracy") in RANK_METRICS:
        raise TaskError(f"{where}: metric accuracy (rank classification) needs answer_choices in its template")
    return Task(**d, source=str(source))


def register_tasks(path: str | Path, replace: bool = False) -> list[Task]:
    """Add the tasks of a YAML file ({tasks: [...]}) to the registry. With `replace_categories: true` in the file,
    its tasks replace every task of another file in their (group, category): `held-in:sentiment` then selects
    the file's sentiment datasets only."""
    _ensure_loaded()  # the built-in tasks first, so the file's own can replace them
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot read task YAML: {e}") from None
    entries = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise TaskError(f"{path}: expected a mapping with a 'tasks' list")
    if not isinstance(doc.get("replace_categories", False), bool):
        raise TaskError(f"{path}: replace_categories must be true or false")
    tasks = [task_from_dict(d, path) for d in entries]
    if doc.get("replace_categories"):
        cats = {(t.group, t.category) for t in tasks}
        for name in [n for n, t in _TASKS.items() if (t.group, t.category) in cats and t.source != str(path)]:
            del _TASKS[name]
    out = []
    for t in tasks:
        if t.name in _TASKS and not replace and _TASKS[t.name].source != t.source:
            raise TaskError(f"{path}: task {t.name!r} already defined in {_TASKS[t.name].source}")
        _TASKS[t.name] = t
        out.append(t)
    return out


def _ensure_loaded():
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for p in sorted(REGISTRY_DIR.glob("*.yaml")):
        register_tasks(p)
    for p in filter(None, os.environ.get("MERGESCALE_TASKS", "").split(os.pathsep)):
        register_tasks(p, replace=True)


def all_tasks() -> list[Task]:
    _ensure_loaded()
    return list(_TASKS.values())


def get_task(name: str) -> Task:
    _ensure_loaded()
    if name not in _TASKS:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_TASKS))} "
                        "(add your own with a task YAML: register_tasks(path) or MERGESCALE_TASKS)")
    return _TASKS[name]


def categories(group: str | None = None) -> list[str]:
    return sorted({t.category for t in all_tasks() if group is None or t.group == group})


def tasks_for(selector: str | list[str]) -> list[Task]:
    """Tasks for a comma-separated selector list, in registry order, without duplicates."""
    _ensure_loaded()
    parts = [s.strip() for s in (selector.split(",") if isinstance(selector, str) else selector) if s.strip()]
    if not parts:
        raise TaskError("empty task selector")
    chosen: list[Task] = []
    for sel in parts:
        key = sel.replace("-", "_")
        group, _, cat = key.partition(":")
        if key == "all":
            hit = all_tasks()
        elif group in GROUPS:
            hit = [t for t in all_tasks() if t.group == group and (not cat or t.category == cat)]
            if cat and not hit:
                raise TaskError(f"no {group} category {cat!r}; {group} categories: {', '.join(categories(group))}")
        elif sel in _TASKS:
            hit = [_TASKS[sel]]
        elif key in categories():
            hit = [t for t in all_tasks() if t.category == key]
        else:
            raise TaskError(f"unknown task or selector {sel!r}; use all, held-in, held-out, held-in:<category>, "
                            f"<category> or a task name. Categories: {', '.join(categories())}; tasks: "
                            f"{', '.join(sorted(_TASKS))}. Add your own tasks with a task YAML: --tasks-yaml FILE, "
                            "or MERGESCALE_TASKS=FILE[:FILE...] (e.g. DATA_DIR/tasks.yaml of `mergescale data build`)")
        chosen += [t for t in hit if t not in chosen]
    return chosen

