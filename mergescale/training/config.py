"""TrainConfig: the one schema for the expert, multitask and instruct recipes (paper defaults).

A train config in YAML (every field but `base` and the data has a default):

    base: /models/llama-it          # the (instruction-tuned) base model directory
    out: runs/expert-sentiment      # the consolidated Hugging Face checkpoint is written here
    tasks: [held-in:sentiment]      # task names or selectors of mergescale.eval.tasks
    optimizer: adafactor            # paper: Adafactor, lr 3e-5, cosine decay, 2,000 steps, dropout 0.05
    batch_size: 32                  # global: micro_batch_size x gradient accumulation x workers
    deepspeed: zero3                # zero2, zero3 (configs/deepspeed/*.json) or a path to a DeepSpeed JSON
    cluster: {workers: 8, use_gpu: true}

Validation errors name the field and what is allowed (`ConfigError`, shared with the merge config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergescale.config import ConfigError, format_errors, parse_size, read_yaml_mapping, resolve_config_path

RECIPES = ("expert", "multitask", "instruct")
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


class EarlyStop(BaseModel):
    """Stop when validation loss has not improved by `min_delta` for `patience` evaluations."""

    model_config = ConfigDict(extra="forbid")
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TrainCluster(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    address: str | None = None  # None: an embedded local Ray; "auto" or ray://host:port otherwise
    max_failures: int = Field(2, ge=0)  # Ray Train restarts the worker group; the loop resumes from the last checkpoint


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    tokenizer: str | None = None  # default: the base model directory
    out: str | None = None
    allow_pickle: bool = False  # a base stored only as pickle (*.bin, *.pt) is refused unless true, as for merges

    # -- data -----------------------------------------------------------------------------------------------
    tasks: list[str] = Field(default_factory=list)  # names or selectors (held-in:sentiment, held-in, ...)
    data_files: list[str] = Field(default_factory=list)  # instruct only: JSONL rows {"input": ..., "target": ...}
    data_dir: str | None = None  # passed to Task.load
    task_files: list[str] = Field(default_factory=list)  # task YAMLs to register first (e.g. DATA_DIR/tasks.yaml)
    chat_template: bool = False  # wrap inputs in the tokenizer's chat template (instruction-tuned bases); the
    #                              paper's raw prompts by default, as `mergescale eval --chat-template` scores them
    mixture_cap: int | None = Field(500_000, ge=1)  # examples-proportional mixing, each source capped (T0: 500k)
    eval_selectors: list[str] = Field(default_factory=lambda: ["held-in", "held-out"])  # instruct leak check
    leak_check: Literal["names", "content"] = "content"  # content: data file prompts vs rendered eval prompts too
    validation_size: int = Field(0, ge=0)  # examples held out of the training pool for validation loss
    max_unscorable: float = Field(0.0, ge=0, le=1)  # fraction of a task's prompts that may be unusable (no target, ...)
    max_input_len: int = Field(2048, ge=1)
    max_output_len: int = Field(512, ge=1)

    # -- optimisation (paper defaults) ----------------------------------------------------------------------
    max_steps: int = Field(2000, ge=1)
    lr: float = Field(3e-5, gt=0)
    optimizer: Literal["adafactor", "adamw"] = "adafactor"
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio at max_steps
    dropout: float = Field(0.05, ge=0, lt=1)
    batch_size: int = Field(32, ge=1)  # global batch, in examples
    micro_batch_size: int = Field(1, ge=1)  # per worker per forward pass
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    early_stop: EarlyStop | None = None
    eval_every: int = Field(0, ge=0)  # steps between validation losses; 0: never

    # -- DeepSpeed, checkpoints, cluster --------------------------------------------------------------------
    deepspeed: str = "zero3"  # zero2 | zero3 | path to a DeepSpeed JSON
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    gradient_checkpointing: bool = False
    out_shard_size: int = 5 * 10**9
    checkpoint_dir: str | None = None  # default: <out parent>/.<out name>.train (must be shared by all workers)
    cluster: TrainCluster = Field(default_factory=TrainCluster)

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @model_validator(mode="after")
    def _checks(self):
        if self.batch_size % (self.micro_batch_size * self.cluster.workers):
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size}) "
                f"x cluster.workers ({self.cluster.workers})"
            )
        if self.early_stop is not None and (self.eval_every == 0 or self.validation_size == 0):
            raise ValueError("early_stop needs eval_every > 0 and validation_size > 0")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.cluster.workers)

    def work_dir(self, out: Path) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else out.parent / f".{out.name}.train"


def check_recipe(recipe: str, config: TrainConfig) -> None:
    """What each recipe needs from the data fields (beyond the schema)."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    if recipe == "expert" and (len(config.tasks) != 1 or config.data_files):
        raise ConfigError(f"recipe expert: 'tasks' must name exactly one task or category selector "
                          f"(got {config.tasks}), and 'data_files' must be empty")
    if recipe == "multitask" and config.data_files:
        raise ConfigError("recipe multitask: 'data_files' is for the instruct recipe; list tasks or selectors in "
                          "'tasks'")
    if recipe == "instruct" and not (config.tasks or config.data_files):
        raise ConfigError("recipe instruct: give the instruction mixture in 'tasks' and/or 'data_files'")


def deepspeed_json(spec: str) -> dict:
    """The DeepSpeed config a spec names (zero2, zero3, or a JSON path); batch fields are filled per run."""
    path = DEEPSPEED_DIR / f"{spec}.json" if spec in ("zero2", "zero3") else Path(spec)
    if not path.is_file():
        raise ConfigError(f"deepspeed: {spec!r} is neither zero2, zero3 nor an existing JSON file ({path})")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object with a zero_optimization object")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ConfigError(f"deepspeed: {path} sets zero_optimization.stage={stage!r}; this trainer supports 2 or 3")
    # The train config owns these: a value here would be overwritten without a word, or clash with the client
    # optimizer the trainer builds.
    owned = [f"{k} (set {v} in the train config)" for k, v in _TRAIN_CONFIG_OWNS.items() if ds.get(k, "auto") != "auto"]
    if owned:
        raise ConfigError(f"deepspeed: {path} sets {'; '.join(owned)}")
    return ds


_TRAIN_CONFIG_OWNS = {
    "optimizer": "optimizer, lr, weight_decay", "scheduler": "lr_schedule, warmup_steps, min_lr_ratio",
    "fp16": "precision", "bf16": "precision", "train_batch_size": "batch_size",
    "train_micro_batch_size_per_gpu": "micro_batch_size", "gradient_accumulation_steps": "batch_size",
    "gradient_clipping": "grad_clip",
}


def load_train_config(source: TrainConfig | dict | str | Path, **overrides) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a dict or a YAML path, with CLI overrides (None values ignored)."""
    if isinstance(source, TrainConfig):
        source = source.model_dump()
    where = ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = read_yaml_mapping(path, "train config")
        where = f" in {path}"
        # Paths are relative to the config file when they exist there, as for merge configs.
        for key in ("base", "tokenizer", "out", "data_dir", "checkpoint_dir"):
            if isinstance(source.get(key), str):
                source[key] = resolve_config_path(path.parent, source[key])
        if isinstance(source.get("deepspeed"), str) and source["deepspeed"] not in ("zero2", "zero3"):
            source["deepspeed"] = resolve_config_path(path.parent, source["deepspeed"])
        if isinstance(source.get("task_files"), list):
            source["task_files"] = [resolve_config_path(path.parent, f) if isinstance(f, str) else f
                                    for f in source["task_files"]]
        if isinstance(source.get("data_files"), list):
            source["data_files"] = [resolve_config_path(path.parent, f) if isinstance(f, str) else f
                                    for f in source["data_files"]]
    source = dict(source)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("workers", "address"):
            source["cluster"] = {**(source.get("cluster") or {}), key: value}
        elif key == "task_files":  # CLI --tasks-yaml adds to the config's own
            source[key] = list(source.get(key) or []) + list(value)
        else:
            source[key] = value
    try:
        return TrainConfig.model_validate(source)
    except ValidationError as e:
        raise ConfigError(format_errors(e, header=f"invalid train config{where}")) from None
