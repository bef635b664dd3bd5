"""Task registry: the paper's held-in / held-out datasets, their T0 prompt templates and metrics.

Public API (stable; the training engine imports it):

    from mergescale.eval.tasks import get_task, tasks_for, Task, Template, PromptedExample

    task = get_task("imdb")                     # TaskError for an unknown name (lists the known ones)
    tasks = tasks_for("held-out,held-in:sentiment,copa")
    # selectors: all | held-in | held-out | held-in:<category> | held-out:<category> | <category> | <task name>
    ds = task.load(task.train_split, data_dir=None)   # a datasets.Dataset; hub when data_dir is None
    for ex in task.prompted(split=task.train_split, data_dir=...):   # PromptedExample, one per renderable row
        ex.input, ex.target                     # a training pair (input text, target text)
        ex.choices, ex.label                    # rank classification: answer strings and the gold index
    task.templates[0].render(row, example_id="7")   # -> PromptedExample, or None when the row has no target
    task.training_pairs(data_dir=D)             # [(input, target), ...] over task.train_split

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

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

REGISTRY_DIR = Path(__file__).parent / "registry"
METRICS = ("accuracy", "accuracy_norm", "rouge_l", "exact_match", "f1")
RANK_METRICS = ("accuracy", "accuracy_norm")  # accuracy_norm: the choice with the best log-prob per character
GROUPS = ("held_in", "held_out", "custom")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow")
_SEP = "|||"


class TaskError(ValueError):
    """Unknown task, bad task YAML, or missing data; the message says what to do."""


@dataclass(frozen=True)
class PromptedExample:
    example_id: str
    input: str
    target: str
    choices: tuple[str, ...] | None = None  # rank classification candidates (None: generation task)
    label: int | None = None  # index of the gold choice
    references: tuple[str, ...] = ()  # gold strings for generation metrics
    target_delimiter: str = " "  # text between input and an answer (input + delimiter + choice)


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed: task YAML can come from users. `choice` is promptsource's random pick; we take the first
    # element so prompts (and cache keys) are deterministic.
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=False)
    env.filters["choice"] = lambda xs: xs[0] if len(xs) else ""
    env.globals.update(zip=zip, enumerate=enumerate, range=range, len=len)
    return env


_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        _ENV = _jinja_env()
    return _ENV


def _split_sep(text: str) -> list[str]:
    return [p.strip() for p in text.split(_SEP)]


@dataclass
class Template:
    name: str
    jinja: str
    answer_choices: str | None = None
    references: str | None = None
    target_delimiter: str = " "

    def __post_init__(self):
        if self.jinja.count(_SEP) != 1:
            raise TaskError(f"template {self.name!r}: jinja must contain exactly one '|||' (input ||| target)")
        env = _env()
        self._t = env.from_string(self.jinja)
        self._c = env.from_string(self.answer_choices) if self.answer_choices else None
        self._r = env.from_string(self.references) if self.references else None

    def render(self, example: dict, example_id: str = "") -> PromptedExample | None:
        """Prompt one dataset row; None when the row has no target (e.g. unlabelled test rows)."""
        choices = None
        if self._c is not None:
            choices = tuple(c for c in _split_sep(self._c.render(**example)))
        text = self._t.render(**example, answer_choices=list(choices or ()))
        inp, _, target = text.partition(_SEP)
        inp, target = inp.strip(), target.strip()
        if not inp or not target:
            return None
        label = None
        if choices is not None:
            if target not in choices:
                return None  # gold answer is not among the choices: the row cannot be rank-classified
            label = choices.index(target)
        refs = tuple(r for r in _split_sep(self._r.render(**example)) if r) if self._r else (target,)
        return PromptedExample(str(example_id), inp, target, choices, label, refs, self.target_delimiter)


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
        raise TaskError(f"task {self.name!r} has no template {name!r}; it has: {', '.join(t.name for t in self.templates)}")

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
            parts = [self._load_file(p) for p in found]
            return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        if not self.hf_id:
            raise TaskError(f"task {self.name!r}: no hf_id and no data_files; pass data_dir (--data-dir)")
        try:
            return datasets.load_dataset(self.hf_id, self.hf_config, split=split)
        except Exception as e:  # noqa: BLE001 - offline, auth, renamed dataset: all mean "provide the files"
            raise TaskError(
                f"task {self.name!r}: loading {self.hf_id} ({self.hf_config}) split {split!r} from the Hugging Face "
                f"Hub failed ({type(e).__name__}: {e}). Offline, pass --data-dir DIR with "
                f"DIR/{self.name}/<split>.parquet|jsonl|json|arrow."
            ) from None

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

    def prompted(self, split: str | None = None, data_dir=None, template: str | None = None,
                 limit: int | None = None, dataset=None) -> Iterator[PromptedExample]:
        """Rendered examples in dataset order; rows the template cannot render are skipped. The example id is
        the row index within the (concatenated) split, stable across runs on the same data."""
        ds = dataset if dataset is not None else self.load(split, data_dir)
        tpl = self.template(template)
        n = 0
        for i, row in enumerate(ds):
            if limit is not None and n >= limit:
                break
            ex = tpl.render(row, example_id=str(i))
            if ex is not None:
                n += 1
                yield ex

    def training_pairs(self, data_dir=None, template: str | None = None, limit: int | None = None) -> list[tuple[str, str]]:
        if not self.train_split:
            raise TaskError(f"task {self.name!r} has no train_split")
        return [(e.input, e.target) for e in self.prompted(self.train_split, data_dir, template, limit)]


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

