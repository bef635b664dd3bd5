"""The one config schema (pydantic) shared by the CLI, the Python API and Ray jobs.

A merge config in YAML:

    base: /models/llama-7b
    experts: [/models/expert-a, {path: /models/expert-b, weight: 0.5}]
    method: ties
    parameters: {density: 0.2, trim_scope: global, sign: mass, lambda: 1.0}
    out_dtype: null          # null = the base's dtype per tensor
    out_shard_size: 5GB
    seed: 0
    tile_mb: null            # float32 MB of one model's rows held at once; null: 320 MB over all models, at most 64
    read: mmap               # or pread: how input rows are read
    write: direct            # or buffered: how the single-process merge writes its shards

Validation errors name the field and what is allowed (`ConfigError`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergescale.merge.methods import METHODS, Factor

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field and what is allowed."""


def parse_size(value: int | str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 5GB, 512MiB or a byte count")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a size such as 5GB, 512MiB or a byte count, got {value!r}")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _SIZE.match(str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"expected a size such as 5GB, 512MiB or a byte count, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"size must be positive, such as 5GB, 512MiB or a byte count, got {value!r}")
    return n


class ExpertSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    weight: Factor = 1.0


class ClusterSpec(BaseModel):
    """How a distributed merge is placed on Ray (ignored by the single-process executor)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    placement: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = "SPREAD"
    address: str | None = None
    max_actor_restarts: int = Field(3, ge=0, description="replacement actors per worker before the merge fails")
    placement_timeout_s: float = Field(120.0, gt=0, description="wait this long for resources (autoscaling)")


# Default tile: this many float32 MB of rows over all models of a unit, at most AUTO_TILE_MB_MAX per model.
AUTO_TILES_MB = 320.0
AUTO_TILE_MB_MAX = 64.0


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base: str | None = None
    experts: list[ExpertSpec] = Field(min_length=1)
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    out: str | None = None
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    out_shard_size: int = 5 * 10**9
    seed: int = Field(0, ge=0)
    tile_mb: float | None = Field(None, gt=0)  # None: AUTO_TILES_MB shared by all models (see tile_bytes)
    tokenizer_source: str = "base"  # "base", "expert:<i>" or a model directory
    allow_architecture_mismatch: bool = False
    allow_pickle: bool = False
    on_nonfinite: Literal["error", "warn"] = "error"
    # mmap: map input rows from the page cache (much less CPU on cached or local files); pread: copy them into
    # reused buffers (for inputs that may be rewritten during a merge, or file systems where mmap is slow)
    read: Literal["mmap", "pread"] = "mmap"
    # direct: the single-process merge writes its shards front to back with O_DIRECT (checkpoint/direct_io.py; ~6x less
    # CPU than copying into the page cache, and output does not crowd out the inputs' cached pages), buffered
    # where the file system has no O_DIRECT; buffered: always through the page cache. Ray actors write buffered.
    write: Literal["direct", "buffered"] = "direct"
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)

    @field_validator("experts", mode="before")
    @classmethod
    def _expert_strings(cls, v):
        if isinstance(v, list):
            return [{"path": e} if isinstance(e, (str, Path)) else e for e in v]
        return v

    @field_validator("out_shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        return parse_size(v)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v):
        if v not in METHODS:
            raise ValueError(f"unknown method {v!r}; allowed: {', '.join(sorted(METHODS))}")
        return v

    @model_validator(mode="after")
    def _method_constraints(self):
        m = METHODS[self.method]
        try:
            m.params.model_validate(self.parameters)
        except ValidationError as e:
            raise ValueError(format_errors(e, prefix="parameters", header=f"bad parameters for method {self.method!r}",
                                           model=m.params)) from None
        if m.needs_base and not self.base:
            raise ValueError(f"method {self.method!r} needs a base model: set 'base'")
        n = len(self.experts)
        if n < m.min_experts or (m.max_experts is not None and n > m.max_experts):
            want = f"exactly {m.min_experts}" if m.min_experts == m.max_experts else f"at least {m.min_experts}"
            raise ValueError(f"method {self.method!r} takes {want} experts, got {n}")
        if not m.uses_weights and any(e.weight != 1.0 for e in self.experts):
            raise ValueError(f"method {self.method!r} does not use per-expert weights; remove 'weight' from experts")
        if getattr(m.params.model_validate(self.parameters), "normalize", False) and sum(self.weights) == 0:
            raise ValueError("experts[].weight: weights sum to 0, so normalize (divide by their sum) is undefined; "
                             "change the weights or set parameters.normalize: false")
        if self.tokenizer_source.startswith("expert:"):
            idx = self.tokenizer_source.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= n:
                raise ValueError(f"tokenizer_source {self.tokenizer_source!r}: expected expert:<0..{n - 1}>")
        if self.tokenizer_source == "base" and not self.base:
            self.tokenizer_source = "expert:0"
        return self

    @property
    def method_params(self):
        return METHODS[self.method].params.model_validate(self.parameters)

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.experts]

    @property
    def n_models(self) -> int:
        return len(self.experts) + (self.base is not None)

    @property
    def tile_bytes(self) -> int:
        """float32 bytes of one model's rows in a unit. Unset, AUTO_TILES_MB is shared by the models (64 MB each
        for base + 4 experts, 36 MB for base + 8), so that peak memory does not grow with the number of experts."""
        mb = self.tile_mb if self.tile_mb is not None else min(AUTO_TILE_MB_MAX, AUTO_TILES_MB / self.n_models)
        return max(4, int(mb * 2**20))


def with_cluster(config: MergeConfig, **updates) -> MergeConfig:
    """`config` with cluster fields replaced where `updates` gives a value (the command line's --workers),
    validated as the config file's own (--workers 0 is as wrong as cluster.workers: 0)."""
    updates = {k: v for k, v in updates.items() if v is not None}
    if not updates:
        return config
    try:
        cluster = ClusterSpec.model_validate({**config.cluster.model_dump(), **updates})
    except ValidationError as e:
        flags = ", ".join(f"--{k}" for k in updates)
        raise ConfigError(format_errors(e, prefix="cluster", header=f"invalid {flags}", model=ClusterSpec)) from None
    return config.model_copy(update={"cluster": cluster})


def format_errors(e: ValidationError, prefix: str = "", header: str = "invalid config",
                  model: type[BaseModel] | None = None) -> str:
    lines = [header + ":"]
    for err in e.errors():
        loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + _allowed_fields(model, tuple(err["loc"]))
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        got = err.get("input")
        got_s = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        if got_s and repr(got) in msg:
            got_s = ""
        lines.append(f"  {loc or '<root>'}: {msg}{got_s}")
    return "\n".join(lines)


def _allowed_fields(model: type[BaseModel] | None, loc: tuple) -> str:
    """'; allowed: ...' for an unknown field at `loc` of `model` (through nested models and lists of them)."""

    def as_model(annotation):
        for a in (annotation, *get_args(annotation)):
            if isinstance(a, type) and not get_args(a) and issubclass(a, BaseModel):
                return a
        return None

    for part in loc[:-1]:
        if model is not None and not isinstance(part, int):
            field = model.model_fields.get(part)
            model = as_model(field.annotation) if field is not None else None
    if model is None:
        return ""
    names = [f.alias or name for name, f in model.model_fields.items()]
    return "; allowed: " + (", ".join(names) if names else "none")


def read_yaml_mapping(path: Path, what: str = "config") -> dict:
    """A YAML file's top-level mapping, or a ConfigError naming the file and what is wrong with it."""
    if not path.is_file():
        raise ConfigError(f"{what} file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_config(source: MergeConfig | dict | str | Path) -> MergeConfig:
    """A MergeConfig from a MergeConfig, a dict, or a YAML file path; ConfigError names bad fields."""
    if isinstance(source, MergeConfig):
        return source
    where = ""
    if isinstance(source, (str, Path)):
        path = Path(source)
        source = read_yaml_mapping(path)
        where = f" in {path}"
        # Relative model paths are relative to the config file, so a config travels with its models. The output
        # does not exist yet, so a relative 'out' is always taken from the config file's directory.
        if isinstance(source.get("base"), str):
            source["base"] = resolve_config_path(path.parent, source["base"])
        if isinstance(source.get("out"), str) and not Path(source["out"]).expanduser().is_absolute():
            source["out"] = str((path.parent / source["out"]).resolve())
        if isinstance(source.get("experts"), list):
            source["experts"] = [
                resolve_config_path(path.parent, e) if isinstance(e, str)
                else {**e, "path": resolve_config_path(path.parent, e["path"])}
                if isinstance(e, dict) and isinstance(e.get("path"), str)
                else e
                for e in source["experts"]
            ]
    try:
        return MergeConfig.model_validate(source)
    except ValidationError as e:
        raise ConfigError(format_errors(e, header=f"invalid merge config{where}", model=MergeConfig)) from None


def resolve_config_path(root: Path, p: str) -> str:
    """A relative path that exists next to the config file is taken from there; anything else (a path relative
    to the working directory, a hub id such as org/model) is kept as written."""
    q = Path(p).expanduser()
    if q.is_absolute() or "://" in p:
        return str(q)
    return str((root / q).resolve()) if (root / q).exists() else p
