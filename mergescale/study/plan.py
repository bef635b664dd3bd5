"""A study's plan: everything validated before anything runs, and what the study will cost.

`make_plan(config)` checks every path (bases, given experts and multitask models are model directories whose
tensors match their base's), every task and its data (evaluation splits, and training splits where a model is
trained), the grid (N no larger than the number of held-in categories), and each train spec (a TrainConfig); an
error names the config field. The plan then lists the trainings, reference evaluations and cells, and
`describe()` prints the counts, bytes, peak disk and an estimated time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from mergescale.config import ConfigError
from mergescale.merge.methods import METHODS as SIGNATURES
from mergescale.study.config import StudyConfig, TrainSpec, load_study_config, size_value
from mergescale.study.grid import Cell, categories_for, cells, multitask_cells
from mergescale.study.ledger import RunDir

RANDOM_METHODS = ("dare_linear", "dare_ties")  # their merge depends on the seed (DARE masks)


@dataclass(eq=False)  # identity: one object per model of the plan, usable as a dict key
class ModelRef:
    """A model the study needs: given (a directory) or trained by the study (`train`: the TrainConfig dict)."""

    base: str
    role: str  # "base" | "expert:<category>" | "multitask"
    path: Path
    field: str  # the config field it comes from, for errors
    train: dict | None = None
    recipe: str | None = None  # expert | multitask

    @property
    def trained_by_study(self) -> bool:
        return self.train is not None


@dataclass
class StudyPlan:
    config: StudyConfig
    run: RunDir
    held_in: list[str]  # categories, sorted
    tasks_of: dict[str, list[str]]  # held-in category -> its task names
    held_out: list[str]  # held-out task names
    task_fingerprints: dict[str, str]
    models: dict[tuple[str, str], ModelRef]
    cells: list[Cell]
    multitask_cells: list[Cell]
    model_bytes: dict[str, int]  # base name -> bytes of its weights
    model_params: dict[str, int]  # base name -> its number of parameters
    eval_examples: dict[str, int] = field(default_factory=dict)  # task -> examples evaluated
    _kept: set | None = field(default=None, repr=False)  # merge identities that keep_merged selects

    # -- what each model and cell is evaluated on ---------------------------------------------------------------
    def held_in_tasks(self, categories) -> list[str]:
        return [t for c in sorted(categories) for t in self.tasks_of[c]]

    def tasks_of_model(self, role: str) -> list[str]:
        """base: every held-in and held-out task; an expert: its category's tasks; multitask: all."""
        if role.startswith("expert:"):
            return self.tasks_of[role.split(":", 1)[1]]
        return self.held_in_tasks(self.held_in) + self.held_out

    def cell_tasks(self, cell: Cell) -> list[str]:
        return self.held_in_tasks(cell.categories) + self.held_out

    def merge_identity(self, cell: Cell) -> tuple:
        """Cells with the same identity merge the same models the same way (e.g. every seed at N = all
        categories, for methods without randomness): they share one merge and one evaluation."""
        m = self.config.methods[[x.label for x in self.config.methods].index(cell.method)]
        return (cell.base, m.method, json.dumps(m.parameters, sort_keys=True), cell.categories, self.dare_seed(cell))

    def dare_seed(self, cell: Cell) -> int | None:
        if cell.method_name not in RANDOM_METHODS:
            return None
        s = self.config.merge.dare_seed
        return cell.seed if s == "cell" else s

    def keeps(self, cell: Cell) -> bool:
        """Whether the merge of `cell` stays on disk once scored (keep_merged): a merge that several cells share
        is kept when any of them is selected."""
        if isinstance(self.config.keep_merged, str):
            return self.config.keep_merged == "all"
        if self._kept is None:
            self._kept = {self.merge_identity(c) for c in self.cells if self.config.keep_selects(c)}
        return self.merge_identity(cell) in self._kept

    def pushes(self, cell: Cell) -> bool:
        """Whether the merge of `cell` goes by push (merged into its base's resident replica, nothing written)."""
        return self.config.pushes and not self.keeps(cell)

    def unique_merges(self) -> list[Cell]:
        seen, out = set(), []
        for c in self.cells:
            if self.merge_identity(c) not in seen:
                seen.add(self.merge_identity(c))
                out.append(c)
        return out

    def trainings(self) -> list[ModelRef]:
        return [m for m in self.models.values() if m.trained_by_study]

    def references(self) -> list[ModelRef]:
        return list(self.models.values())

    # -- cost ---------------------------------------------------------------------------------------------------
    def merge_read_bytes(self, cell: Cell) -> int:
        m = self.config.methods[[x.label for x in self.config.methods].index(cell.method)]
        sig = SIGNATURES[m.method]
        params = sig.params.model_validate(m.parameters)
        passes = 2 if getattr(params, "trim_scope", None) == "global" and sig.selection(params) is not None else 1
        return passes * (cell.n_experts + int(sig.needs_base)) * self.model_bytes[cell.base]

    def describe(self, rates: dict | None = None) -> str:
        from mergescale.merge.inputs import human_bytes

        rates = rates or default_rates()
        c = self.config
        merges = self.unique_merges()
        trains = self.trainings()
        refs = self.references()
        n_ref_evals = sum(len(self.tasks_of_model(m.role)) for m in refs)
        n_cell_evals = sum(len(self.cell_tasks(x)) for x in merges)
        read = sum(self.merge_read_bytes(x) for x in merges)
        written = [x for x in merges if not self.pushes(x)]  # pushed: merged in memory, nothing written
        write = sum(self.model_bytes[x.base] for x in written)
        trained_bytes = sum(self.model_bytes[m.base] for m in trains)
        biggest = max(self.model_bytes.values())
        kept = sum(self.keeps(x) for x in written)
        how = ([f"{len(merges) - len(written)} of {len(merges)} merges by push"] if c.pushes else []) \
            + ([f"{kept} kept by keep_merged"] if kept else [])
        alive = kept + min(c.max_merged_alive, len(written) - kept)
        peak = trained_bytes + min(alive, len(merges)) * biggest
        t = estimate_seconds(self, rates)
        lines = [
            f"study             {c.name}  ->  {self.run.root}",
            "bases             " + ", ".join(f"{b.name} ({b.kind}, {b.size})" for b in c.bases),
            "methods           " + ", ".join(f"{m.label} ({m.method})" for m in c.methods),
            f"held-in           {len(self.held_in)} categories, {sum(len(v) for v in self.tasks_of.values())} tasks; "
            f"held-out {len(self.held_out)} tasks ({', '.join(self.held_out)})",
            f"grid              N in {c.num_experts} x seeds {c.seeds}: {len(self.cells)} cells, {len(merges)} merges "
            f"({len(self.cells) - len(merges)} cells share another cell's merge)",
            f"trainings         {len(trains)}"
            + (f" ({', '.join(f'{m.base}/{m.role}' for m in trains)})" if trains else ""),
            f"evaluations       {len(refs)} reference models ({n_ref_evals} model-task evaluations) + {len(merges)} "
            f"merged models ({n_cell_evals} model-task evaluations)",
            f"bytes to read     {human_bytes(read)} (merges)",
            f"bytes to write    {human_bytes(write)} merged" + (f" ({', '.join(how)})" if how else "")
            + (f" + {human_bytes(trained_bytes)} trained" if trains else ""),
            f"peak disk         {human_bytes(peak)} (trained models + {min(alive, len(merges))} merged "
            f"checkpoint(s) alive at once)",
            f"estimated time    {_hms(t['training'] + (sum(t.values()) - t['training']) / c.max_merged_alive)} with "
            f"{c.max_merged_alive} cells at once (when the cluster has the resources); one at a time "
            f"{_hms(sum(t.values()))}: training {_hms(t['training'])}, reference evaluations {_hms(t['references'])}, "
            f"merges {_hms(t['merges'])}, cell evaluations {_hms(t['cells'])} ({rates['source']})",
            "",
            "categories merged (the seed rule; the same for every base, size and method):",
        ]
        for n in c.num_experts:
            for s in c.seeds:
                lines.append(f"  N={n} seed={s}: {', '.join(categories_for(s, n, self.held_in))}")
        return "\n".join(lines)


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# -- rates for the estimate ------------------------------------------------------------------------------------------
# Rough rates of one CPU core (the machine in docs/BENCHMARKS.md); `study plan` on a run directory with finished work
# uses that run's measured rates instead. Evaluation and training cost scale with the parameter count.
DEFAULT_RATES = {"merge_bytes_per_s": 1.0e9, "eval_param_examples_per_s": 3.0e8, "train_param_tokens_per_s": 1.0e10}


def default_rates() -> dict:
    return {**DEFAULT_RATES, "source": "rough default rates of one CPU core; rerun `study plan` after some work "
                                       "is done for this run's measured rates"}


def measured_rates(run: RunDir) -> dict:
    """Rates from this run directory's timings.jsonl, where it has them; defaults for the rest."""
    rates, got = default_rates(), []
    ev = run.timings()
    for kind, key, num in (("merge", "merge_bytes_per_s", "bytes_read"),
                           ("eval", "eval_param_examples_per_s", "param_examples"),
                           ("train", "train_param_tokens_per_s", "param_tokens")):
        rows = [e for e in ev if e["kind"] == kind and e.get(num)]
        secs = sum(e["end"] - e["start"] for e in rows)
        if rows and secs > 0:
            rates[key] = sum(e[num] for e in rows) / secs
            got.append(kind)
    if got:
        rates["source"] = f"rates measured in {run.root}: {', '.join(got)}"
    return rates


def estimate_seconds(plan: StudyPlan, rates: dict) -> dict[str, float]:
    c = plan.config
    params = plan.model_params
    train = 0.0
    for m in plan.trainings():
        cfg = {**m.train}
        tokens = cfg.get("max_steps", 2000) * cfg.get("batch_size", 32) * (cfg.get("max_input_len", 2048) // 4)
        train += tokens * params[m.base] / rates["train_param_tokens_per_s"]
    per_task = {t: plan.eval_examples.get(t, c.eval.limit or 1000) for t in plan.task_fingerprints}

    def evals(base, tasks):
        return sum(per_task[t] for t in tasks) * params[base] / rates["eval_param_examples_per_s"]

    refs = sum(evals(m.base, plan.tasks_of_model(m.role)) for m in plan.references())
    merges = plan.unique_merges()
    merge_s = sum(plan.merge_read_bytes(x) for x in merges) / rates["merge_bytes_per_s"]
    cell_s = sum(evals(x.base, plan.cell_tasks(x)) for x in merges)
    return {"training": train, "references": refs, "merges": merge_s, "cells": cell_s}


# -- building the plan -----------------------------------------------------------------------------------------------
def make_plan(source, **overrides) -> StudyPlan:
    """Validate the study (config, paths, tasks and data, models) and build its plan; ConfigError names the field."""
    config = load_study_config(source, **overrides)
    from mergescale.eval.tasks import TaskError, register_tasks

    if config.data_build is not None:
        config = _build_data(config)
    for i, y in enumerate(config.eval.tasks_yaml):
        try:
            register_tasks(y, replace=True)
        except TaskError as e:
            raise ConfigError(f"eval.tasks_yaml[{i}]: {e}") from None
    held_in, tasks_of, held_out = _tasks(config)
    for n in config.num_experts:
        if n > len(held_in):
            raise ConfigError(f"num_experts: {n} is more than the {len(held_in)} held-in categories "
                              f"({', '.join(held_in)})")
    run = RunDir(config.work_dir)
    models = _models(config, held_in, run)
    sizes = {b.name: _check_models(config, b.name, models) for b in config.bases}
    needs_train_data = sorted({t for m in models.values() if m.trained_by_study
                               for t in (tasks_of[m.role.split(":", 1)[1]] if m.role.startswith("expert:")
                                         else [x for c in held_in for x in tasks_of[c]])})
    fps, counts = _task_data(config, [t for c in held_in for t in tasks_of[c]] + held_out, needs_train_data)
    for m in models.values():
        if m.trained_by_study:
            _check_train_spec(m)
    return StudyPlan(config, run, held_in, tasks_of, held_out, fps, models, cells(config, held_in),
                     multitask_cells(config, held_in), {b: n for b, (n, _) in sizes.items()},
                     {b: p for b, (_, p) in sizes.items()}, counts)


def _build_data(config: StudyConfig) -> StudyConfig:
    """The real datasets in config.data_build (built there once), their tasks.yaml first among eval.tasks_yaml."""
    from mergescale.data.build import MANIFEST, build_data
    from mergescale.data.packages import DataBuildError

    d = Path(config.data_build)
    if not (d / MANIFEST).exists():
        print(f"building the real datasets into {d} (once; mergescale data build)", flush=True)
        try:
            build_data(d)
        except DataBuildError as e:
            raise ConfigError(f"data_build: {e}") from None
    yaml_path = str(d / "tasks.yaml")
    others = [y for y in config.eval.tasks_yaml if y != yaml_path]
    ev = config.eval.model_copy(update={"tasks_yaml": [yaml_path, *others]})
    return config.model_copy(update={"eval": ev})


def _tasks(config: StudyConfig) -> tuple[list[str], dict[str, list[str]], list[str]]:
    from mergescale.eval.tasks import TaskError, categories, tasks_for

    known = categories("held_in")
    held_in = sorted(config.held_in) if config.held_in is not None else known
    if not held_in:
        raise ConfigError("held_in: no held-in categories (the task registry has none; register task YAMLs with "
                          "eval.tasks_yaml)")
    unknown = [c for c in held_in if c not in known]
    if unknown:
        raise ConfigError(f"held_in: unknown held-in categor{'y' if len(unknown) == 1 else 'ies'} "
                          f"{', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    tasks_of = {c: [t.name for t in tasks_for(f"held-in:{c}")] for c in held_in}
    try:
        out = tasks_for(config.held_out) if config.held_out else []
    except TaskError as e:
        raise ConfigError(f"held_out: {e}") from None
    wrong = [t.name for t in out if t.group == "held_in"]
    if wrong:
        what = "is a held-in task" if len(wrong) == 1 else "are held-in tasks"
        raise ConfigError(f"held_out: {', '.join(wrong)} {what}; held-out tasks are normalized by the base, "
                          "held-in ones by their category's expert")
    return held_in, tasks_of, [t.name for t in out]


def _model_dir(spec: str, field: str) -> Path:
    """A given model as a local directory: package:/gguf: specs imported once, hub ids fetched
    (mergescale.models.sources.resolve_model_dir); ConfigError naming the field otherwise."""
    from mergescale.checkpoint.read import CheckpointError
    from mergescale.models.sources import resolve_model_dir

    try:
        return resolve_model_dir(spec).resolve()
    except CheckpointError as e:
        raise ConfigError(f"{field}: {e}") from None


def _models(config: StudyConfig, held_in: list[str], run: RunDir) -> dict[tuple[str, str], ModelRef]:
    models = {}
    for b in config.bases:
        field = f"bases[{b.name}].path"
        base_dir = _model_dir(b.path, field)
        models[(b.name, "base")] = ModelRef(b.name, "base", base_dir, field)
        given = config.experts.get(b.name, {})
        missing = [c for c in held_in if c not in given]
        if missing:
            raise ConfigError(f"experts.{b.name}: no expert for held-in categor{'y' if len(missing) == 1 else 'ies'} "
                              f"{', '.join(missing)}; give a model directory or 'train' for each")
        extra = sorted(set(given) - set(held_in))
        if extra:
            raise ConfigError(f"experts.{b.name}: {', '.join(extra)} not among the held-in categories "
                              f"({', '.join(held_in)})")
        for cat in held_in:
            src = given[cat]
            f = f"experts.{b.name}.{cat}"
            if isinstance(src, TrainSpec):
                train = {**config.training, **src.train, "base": str(base_dir), "tasks": [f"held-in:{cat}"]}
                out = run.path("models", b.name, "experts", cat)
                models[(b.name, f"expert:{cat}")] = ModelRef(b.name, f"expert:{cat}", out, f, train, "expert")
            else:
                models[(b.name, f"expert:{cat}")] = ModelRef(b.name, f"expert:{cat}", _model_dir(src, f), f)
        if b.name in config.multitask:
            src = config.multitask[b.name]
            f = f"multitask.{b.name}"
            if isinstance(src, TrainSpec):
                train = {**config.training, **src.train, "base": str(base_dir),
                         "tasks": [f"held-in:{c}" for c in held_in]}
                models[(b.name, "multitask")] = ModelRef(b.name, "multitask", run.path("models", b.name, "multitask"),
                                                         f, train, "multitask")
            else:
                models[(b.name, "multitask")] = ModelRef(b.name, "multitask", _model_dir(src, f), f)
    for m in models.values():
        if m.train is not None:  # trained on the data, tasks and prompt format the study evaluates with
            m.train.setdefault("data_dir", config.eval.data_dir)
            m.train.setdefault("task_files", list(config.eval.tasks_yaml))
            m.train.setdefault("chat_template", config.eval.chat_template)
            m.train["out"] = str(m.path)
    return models


def _check_models(config: StudyConfig, base: str, models: dict) -> tuple[int, int]:
    """Every given model of a base opens and holds the base's tensors (the merge's own checks); returns the base's
    (weight bytes, parameters)."""
    from mergescale.checkpoint.read import Checkpoint, CheckpointError
    from mergescale.merge.inputs import MergeInputError, MergeInputs, check_architectures, check_same_tensors

    mine = [m for (b, _), m in models.items() if b == base and not m.trained_by_study]
    opened = {}
    try:
        for m in mine:
            try:
                opened[m.role] = Checkpoint(m.path)
            except CheckpointError as e:
                raise ConfigError(f"{m.field}: {e}") from None
        ref = opened["base"]
        for role, ck in opened.items():
            if role == "base":
                continue
            try:
                inputs = MergeInputs(ref, [ck], ref.path)
                check_same_tensors(inputs)
                check_architectures(inputs, allow_mismatch=False)
            except MergeInputError as e:
                raise ConfigError(f"{models[(base, role)].field}: {e}") from None
        return sum(t.nbytes for t in ref.tensors.values()), sum(t.numel for t in ref.tensors.values())
    finally:
        for ck in opened.values():
            ck.close()


def _task_data(config: StudyConfig, eval_tasks: list[str], train_tasks: list[str]) -> tuple[dict, dict]:
    """Load every evaluation split (and the training splits the study trains on): a missing or unreadable file
    fails here, naming the task. Returns each task's fingerprint (definition + data) and evaluated example count."""
    from mergescale.eval.tasks import TaskError, get_task

    fps, counts = {}, {}
    ev = config.eval
    for name in dict.fromkeys(eval_tasks):
        task = get_task(name)
        try:  # the rows each evaluation will score, checked as the evaluation checks them (columns, labels)
            tpl = ev.template if ev.template in {t.name for t in task.templates} else None
            rendered = task.render_rows(task.load(None, ev.data_dir), tpl, ev.limit, None, ev.data_dir,
                                        sample_seed=ev.sample_seed)
            rendered.check(name, ev.max_unscorable, partial(task.row_origin, None, ev.data_dir), "eval.max_unscorable")
        except TaskError as e:
            raise ConfigError(f"eval: {e}") from None
        if not rendered.examples:
            raise ConfigError(f"eval: task {name!r}: none of its {rendered.rows} rows can be scored "
                              f"({task.data_source(None, ev.data_dir)})")
        counts[name] = len(rendered.examples)
        fps[name] = task_fingerprint(task, ev.data_dir)
    for name in train_tasks:
        task = get_task(name)
        try:
            task.load(task.train_split, config.training.get("data_dir") or ev.data_dir)
        except TaskError as e:
            raise ConfigError(f"training: {e}") from None
    return fps, counts


def task_fingerprint(task, data_dir) -> str:
    """What an evaluation on this task depends on: its definition (templates, metric, split) and its data (the
    sha256 of each local file, or the hub dataset's id)."""
    from dataclasses import asdict

    d = {k: v for k, v in asdict(task).items() if k not in ("source", "fixture", "data_files")}
    found, _ = task.local_files(task.eval_split, data_dir)
    if found:
        d["data"] = [file_sha256(p) for p in found]
    else:
        d["data"] = [task.hf_id, task.hf_config]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _check_train_spec(m: ModelRef) -> None:
    from mergescale.training.config import check_recipe, load_train_config

    try:
        cfg = load_train_config(m.train)
        check_recipe(m.recipe, cfg)
    except ConfigError as e:
        raise ConfigError(f"{m.field} (train spec, over `training`): {e}") from None


__all__ = ["StudyPlan", "ModelRef", "make_plan", "size_value", "measured_rates", "default_rates"]
