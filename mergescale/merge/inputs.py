"""Opening and validating a merge's inputs, and cutting the work into units. Nothing here writes anything.

All checks that can be made from headers and configs run before any output exists (`prepare`): every model opens
(corrupt or truncated files are named), base and experts hold the same tensor names and shapes, the architectures
agree, the output location is free. Non-finite values need the data, so they are caught as tiles are read
(mergescale.merge.reader) or, on the fused kernels' path, as they are merged.

No torch here: a Ray driver validates and plans with this module while its actors load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mergescale.checkpoint.layout import OutputLayout
from mergescale.checkpoint.output_dir import METADATA_FILES, check_output, human_bytes, room  # noqa: F401 (re-exported)
from mergescale.checkpoint.read import Checkpoint, CheckpointError, TensorInfo, read_model_config, safetensors_dtype
from mergescale.config import MergeConfig, load_config
from mergescale.errors import MergeInputError
from mergescale.models.sources import resolve_model_dir

SHOW = 5  # how many names of each kind an error lists
# (MergeInputError and check_output moved to errors.py and output_dir.py; imported from here, they still work)


@dataclass
class MergeInputs:
    base: Checkpoint | None
    experts: list[Checkpoint]
    metadata_source: Path  # where config.json / tokenizer files are copied from

    @property
    def layout_source(self) -> Checkpoint:
        return self.base if self.base is not None else self.experts[0]

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base is not None else []) + self.experts

    def close(self) -> None:
        for c in self.all:
            c.close()


def open_inputs(config: MergeConfig) -> MergeInputs:
    def open_one(spec: str, role: str) -> Checkpoint:
        try:
            return Checkpoint(resolve_model_dir(spec), allow_pickle=config.allow_pickle)
        except CheckpointError as e:
            raise MergeInputError(f"{role} model: {e}") from None

    base = open_one(config.base, "base") if config.base else None
    experts = [open_one(e.path, f"expert {i}") for i, e in enumerate(config.experts)]
    inputs = MergeInputs(base, experts, Path("."))
    inputs.metadata_source = _metadata_source(config, inputs)
    check_same_tensors(inputs)
    check_architectures(inputs, config.allow_architecture_mismatch)
    return inputs


def _metadata_source(config: MergeConfig, inputs: MergeInputs) -> Path:
    src = config.tokenizer_source
    if src == "base":
        path = inputs.layout_source.path
    elif src.startswith("expert:"):
        path = inputs.experts[int(src.split(":", 1)[1])].path
    else:
        path = Path(src)
    if not path.is_dir():
        raise MergeInputError(f"tokenizer_source {src!r}: {path} is not a directory")
    if not any((path / f).exists() for f in METADATA_FILES):
        raise MergeInputError(f"tokenizer_source {src!r}: {path} has none of {', '.join(METADATA_FILES[:4])}, ...")
    if (path / "config.json").exists():  # the output's config.json (checked here, not when the merge is done)
        try:
            read_model_config(path)
        except CheckpointError as e:
            raise MergeInputError(f"tokenizer_source {src!r}: {e}") from None
    return path


def _files_of(c: Checkpoint, names) -> str:
    return ", ".join(sorted({c.tensors[n].file.name for n in names if n in c.tensors}))


def check_same_tensors(inputs: MergeInputs) -> None:
    """Every model must hold exactly the reference's tensor names and shapes (float-ness must agree too)."""
    ref = inputs.layout_source
    problems = []
    for c in inputs.all:
        if c is ref:
            continue
        missing = [n for n in ref.tensors if n not in c.tensors]
        extra = [n for n in c.tensors if n not in ref.tensors]
        shape = [n for n in ref.tensors if n in c.tensors and c.tensors[n].shape != ref.tensors[n].shape]
        kind = [n for n in ref.tensors if n in c.tensors and c.tensors[n].is_float != ref.tensors[n].is_float]
        if not (missing or extra or shape or kind):
            continue
        lines = [f"{c.path} differs from {ref.path}:"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors (in {_files_of(ref, missing)} of the reference): "
                         + ", ".join(missing[:SHOW]) + (" ..." if len(missing) > SHOW else ""))
        if extra:
            lines.append(f"  {len(extra)} extra tensors (in {_files_of(c, extra)}): " + ", ".join(extra[:SHOW])
                         + (" ..." if len(extra) > SHOW else ""))
        if shape:
            lines.append(f"  {len(shape)} tensors with other shapes: " + ", ".join(
                f"{n} {list(c.tensors[n].shape)} in {c.tensors[n].file.name} "
                f"vs {list(ref.tensors[n].shape)} in {ref.tensors[n].file.name}" for n in shape[:SHOW]))
        if kind:
            lines.append(f"  {len(kind)} tensors float in one model, integer in the other: " + ", ".join(
                f"{n} ({c.tensors[n].dtype} vs {ref.tensors[n].dtype})" for n in kind[:SHOW]))
        problems.append("\n".join(lines))
    if problems:
        raise MergeInputError("models do not have the same tensors:\n" + "\n".join(problems))


def check_architectures(inputs: MergeInputs, allow_mismatch: bool) -> None:
    ref = inputs.layout_source
    if not (ref.path / "config.json").is_file():
        raise MergeInputError(f"{ref.path}: no config.json; a merged model needs the reference model's config")
    want = (ref.config.get("model_type"), ref.config.get("architectures"))
    for c in inputs.all:
        if allow_mismatch:
            break
        if not (c.path / "config.json").is_file():
            raise MergeInputError(
                f"{c.path}: no config.json; it tells whether this model has the architecture of "
                f"{ref.path} ({want[0]!r}/{want[1]!r}). Add it, or set allow_architecture_mismatch: true to merge "
                "without that check"
            )
        got = (c.config.get("model_type"), c.config.get("architectures"))
        if got != want:
            raise MergeInputError(
                f"{c.path / 'config.json'}: model_type/architectures {got[0]!r}/{got[1]!r} differ from "
                f"{ref.path / 'config.json'}: {want[0]!r}/{want[1]!r}; "
                "set allow_architecture_mismatch: true to merge anyway"
            )


# --------------------------------------------------------------------------------------------------------------
# Units of work


@dataclass(frozen=True)
class Unit:
    """Rows [row_start, row_end) of one tensor: the grain of reading, merging, writing, and resuming."""

    id: int
    name: str
    row_start: int
    row_end: int


@dataclass
class MergePlan:
    tensors: list[TensorInfo]  # in the reference's file order
    out_dtypes: dict[str, str]  # safetensors dtype code per tensor
    units: list[Unit]
    units_of: dict[str, list[Unit]]
    layout: OutputLayout
    n_models: int
    tile_bytes: int
    float_numel: int = 0
    warnings: list[str] = field(default_factory=list)

    def read_bytes(self, inputs: MergeInputs) -> int:
        return sum(c.tensors[t.name].nbytes for c in inputs.all for t in self.tensors)

    def starts_split_tensor(self, unit: Unit) -> bool:
        """Whether `unit` is the first of a tensor split into several units (whole tiles: where memory peaks)."""
        return unit.row_start == 0 and len(self.units_of[unit.name]) > 1

    @property
    def write_bytes(self) -> int:
        return self.layout.total_tensor_bytes

    @property
    def largest_tile_bytes(self) -> int:
        """float32 bytes of the largest unit of one model."""
        by_name = {t.name: t for t in self.tensors}
        return max((u.row_end - u.row_start) * by_name[u.name].row_numel * 4 for u in self.units) if self.units else 0

    def estimated_peak_bytes(self) -> int:
        """Inputs in float32 + the next unit prefetched in its stored dtype + the method's temporaries
        (task vectors, masks, sums): about (2 N + 4) tiles for N experts plus the base."""
        return (2 * self.n_models + 4) * self.largest_tile_bytes


def plan_merge(config: MergeConfig, inputs: MergeInputs) -> MergePlan:
    ref = inputs.layout_source
    forced = safetensors_dtype(config.out_dtype) if config.out_dtype else None
    tensors = list(ref.tensors.values())
    out_dtypes = {t.name: (forced if (forced is not None and t.is_float) else t.dtype) for t in tensors}
    units, units_of = [], {}
    for t in tensors:
        rows_per_tile = max(1, config.tile_bytes // max(1, t.row_numel * 4))
        mine = []
        for r in range(0, t.rows, rows_per_tile):
            mine.append(Unit(len(units) + len(mine), t.name, r, min(t.rows, r + rows_per_tile)))
        units.extend(mine)
        units_of[t.name] = mine
    layout = OutputLayout.plan([(t.name, out_dtypes[t.name], t.shape) for t in tensors], config.out_shard_size)
    return MergePlan(
        tensors=tensors,
        out_dtypes=out_dtypes,
        units=units,
        units_of=units_of,
        layout=layout,
        n_models=len(inputs.all),
        tile_bytes=config.tile_bytes,
        float_numel=sum(t.numel for t in tensors if t.is_float),
    )


def output_room(plan: MergePlan, inputs: MergeInputs, out: Path, run_key: str) -> tuple[int, int]:
    """(bytes the merge still has to write on the output's file system, bytes free there): output_dir.room, with
    the metadata files copied from inputs.metadata_source and a journal line (unit id and input digests in hex)
    plus manifest entry per unit."""
    metadata = sum(f.stat().st_size for f in (inputs.metadata_source / n for n in METADATA_FILES) if f.is_file())
    extra = metadata + len(plan.units) * (80 + 33 * plan.n_models) + 2**20
    return room(out, plan.layout.shard_names, plan.layout.shard_sizes, extra, run_key)


def unit_read_bytes(inputs: MergeInputs, unit: Unit) -> int:
    return sum(c.tensors[unit.name].rows_nbytes(unit.row_start, unit.row_end) for c in inputs.all)


def progress_bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, disable=not progress,
                dynamic_ncols=True)


def prepare_inputs(config: MergeConfig | dict | str | Path):
    """Config, inputs and plan of a merge that writes no output directory (a push): all validation but the
    output's."""
    config = load_config(config)
    inputs = open_inputs(config)
    try:
        plan = plan_merge(config, inputs)
    except BaseException:
        inputs.close()
        raise
    return config, inputs, plan


def prepare(config: MergeConfig | dict | str | Path, out: str | Path | None, overwrite: bool):
    """Everything before the first byte is written: config, inputs, validation, plan."""
    config = load_config(config)
    out = out or config.out
    if out is None:
        raise MergeInputError("no output directory: pass --out DIR (or set 'out' in the config)")
    out = Path(out).absolute()
    config, inputs, plan = prepare_inputs(config)
    try:
        check_output(out, overwrite, [c.path for c in inputs.all])
    except BaseException:
        inputs.close()
        raise
    return config, out, inputs, plan
