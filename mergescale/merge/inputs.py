"""Opening and validating a merge's inputs, and cutting the work into units. Nothing here writes anything.

All checks that can be made from headers and configs run before any output exists: every model opens (corrupt or
truncated files are named), base and experts hold the same tensor names and shapes, the architectures agree, the
output location is free. Non-finite values need the data, so they are caught while tiles are read (`read_unit`) or,
on the fused kernels' path, as they are merged (`check_finite` then runs only where a kernel found some).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergescale.config import MergeConfig
from mergescale.merge import kernels
from mergescale.merge.checkpoint import TORCH_TO_SAFETENSORS, Checkpoint, CheckpointError, TensorInfo, resolve_model_dir
from mergescale.merge.writer import METADATA_FILES, OutputLayout

log = logging.getLogger(__name__)
SHOW = 5  # how many names of each kind an error lists


class MergeInputError(ValueError):
    """Inputs that cannot be merged as configured; the message names models, files and tensors."""


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
            lines.append(f"  missing {len(missing)} tensors (in {_files_of(ref, missing)} of the reference): " + ", ".join(missing[:SHOW]) + (" ..." if len(missing) > SHOW else ""))
        if extra:
            lines.append(f"  {len(extra)} extra tensors (in {_files_of(c, extra)}): " + ", ".join(extra[:SHOW]) + (" ..." if len(extra) > SHOW else ""))
        if shape:
            lines.append(f"  {len(shape)} tensors with other shapes: " + ", ".join(
                f"{n} {list(c.tensors[n].shape)} in {c.tensors[n].file.name} vs {list(ref.tensors[n].shape)} in {ref.tensors[n].file.name}" for n in shape[:SHOW]))
        if kind:
            lines.append(f"  {len(kind)} tensors float in one model, integer in the other: " + ", ".join(
                f"{n} ({c.tensors[n].dtype} vs {ref.tensors[n].dtype})" for n in kind[:SHOW]))
        problems.append("\n".join(lines))
    if problems:
        raise MergeInputError("models do not have the same tensors:\n" + "\n".join(problems))


def check_architectures(inputs: MergeInputs, allow_mismatch: bool) -> None:
    ref = inputs.layout_source
    if not ref.config:
        raise MergeInputError(f"{ref.path}: no config.json; a merged model needs the reference model's config")
    want = (ref.config.get("model_type"), ref.config.get("architectures"))
    for c in inputs.all:
        got = (c.config.get("model_type"), c.config.get("architectures"))
        if got != want and not allow_mismatch:
            raise MergeInputError(
                f"{c.path / 'config.json'}: model_type/architectures {got[0]!r}/{got[1]!r} differ from "
                f"{ref.path / 'config.json'}: {want[0]!r}/{want[1]!r}; set allow_architecture_mismatch: true to merge anyway"
            )


def check_output(out: Path, overwrite: bool, inputs: list[Path] = ()) -> None:
    if out.exists() and not overwrite:
        raise MergeInputError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"output path {out} exists and is not a directory")
    target = out.resolve()
    for p in inputs:  # --overwrite would delete an input model (the commit replaces the whole directory)
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise MergeInputError(f"output directory {out} holds the input model {p}; choose another --out")


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
    forced = getattr(torch, config.out_dtype) if config.out_dtype else None
    tensors = list(ref.tensors.values())
    out_dtypes = {
        t.name: (TORCH_TO_SAFETENSORS[forced] if (forced is not None and t.is_float) else t.dtype) for t in tensors
    }
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


def all_finite(t: torch.Tensor) -> bool:
    """True iff every value of a float tensor is finite. A float sum is NaN or inf whenever any term is (NaN and inf
    propagate through every addition order), so one cheap reduction in the stored dtype settles the common case;
    only a non-finite sum (a bad value, or an overflow of the sum itself) pays for the exact elementwise check.
    bf16/float32 tiles on the CPU take a compiled scan of the exponent bits instead (several times faster)."""
    bad = kernels.count_nonfinite(t)
    if bad is not None:
        return bad == 0
    try:
        if bool(torch.isfinite(t.sum())):
            return True
    except RuntimeError:  # dtypes without a CPU sum (float8): exact check only
        pass
    return bool(torch.isfinite(t).all())


def read_unit(inputs: MergeInputs, unit: Unit, on_nonfinite: str, warnings: list[str] | None = None,
              convert: bool = True, buffers: list[torch.Tensor] | None = None, mapped: bool = False):
    """Rows of the unit from the base (None without one) and every expert, as float32 (integers stay as stored).

    convert=False keeps float tiles in their stored dtype (callers convert small chunks as they compute, which
    is much faster than converting whole tiles); `buffers` (one uint8 tensor per model, base first) are reused
    for the reads, or with mapped=True the rows are mapped from the page cache instead (`Checkpoint.map_rows`).
    Non-finite values: see `check_finite` ('ignore': the caller deals with them itself).
    """
    tiles = []
    for j, c in enumerate(inputs.all):
        if mapped:
            t = c.map_rows(unit.name, unit.row_start, unit.row_end)
        else:
            t = c.read_rows(unit.name, unit.row_start, unit.row_end, out=buffers[j] if buffers is not None else None)
        tiles.append(t)
    check_finite(inputs, unit, tiles, on_nonfinite, warnings)
    if convert:
        tiles = [t.to(torch.float32) if c.tensors[unit.name].is_float else t for c, t in zip(inputs.all, tiles)]
    if inputs.base is None:
        return None, tiles
    return tiles[0], tiles[1:]


def check_finite(inputs: MergeInputs, unit: Unit, tiles: list[torch.Tensor], on_nonfinite: str,
                 warnings: list[str] | None = None) -> None:
    """Apply the non-finite policy to a unit's tiles (base first, as `inputs.all`): an error naming the model and
    tensor, or a warning with on_nonfinite='warn'; 'ignore' checks nothing."""
    if on_nonfinite == "ignore":
        return
    for c, t in zip(inputs.all, tiles, strict=True):
        if not c.tensors[unit.name].is_float or all_finite(t):
            continue
        bad = int((~torch.isfinite(t)).sum())
        msg = (f"{c.path}: tensor {unit.name!r} (rows {unit.row_start}-{unit.row_end}, file "
               f"{c.tensors[unit.name].file.name}) has {bad} non-finite values (NaN/inf)")
        if on_nonfinite == "error":
            raise MergeInputError(msg + "; set on_nonfinite: warn to merge anyway")
        log.warning(msg)
        if warnings is not None:
            warnings.append(msg)


class UnitReader:
    """Reads units (`read_unit`, stored dtype) one ahead of the caller, on a thread. read='mmap' maps them from the
    page cache (no copy: ~4x less CPU than `preadv` on cached files, which on a small node is CPU the kernels
    need); read='pread' copies them into two sets of raw buffers used in turn (a fresh 64 MB tile per model and
    unit would cost more in page faults than the read itself).

    `get(unit)`'s tiles stay valid until the next `get`. `prefetch(unit)` starts the read the caller will ask for
    next; a prefetch that turns out wrong (a Ray actor's hint of its next batch, which another actor took) is
    waited out and dropped, its errors and warnings with it (whoever merges that unit reads it again).

    check=False skips the non-finite scan (a pass over every byte) for a caller that applies `check_finite`
    itself only when it needs to: the fused kernels detect non-finite inputs as they compute."""

    def __init__(self, inputs: MergeInputs, on_nonfinite: str, read: str = "mmap"):
        if read not in ("mmap", "pread"):
            raise ValueError(f"read must be 'mmap' or 'pread', got {read!r}")
        self.inputs, self.on_nonfinite, self.mapped = inputs, on_nonfinite, read == "mmap"
        self._slots: list[list[torch.Tensor]] = [[], []]
        self._next = 0  # the slot the next read goes into (the caller holds the other one)
        self._pending = None  # (unit, future of (base, experts, warnings, checked))
        self._pool: ThreadPoolExecutor | None = None

    def _read(self, unit: Unit, slot: int, check: bool = True):
        warnings, policy = [], self.on_nonfinite if check else "ignore"
        if self.mapped:
            base, experts = read_unit(self.inputs, unit, policy, warnings, convert=False, mapped=True)
            return base, experts, warnings, check
        buffers = self._slots[slot]
        for j, c in enumerate(self.inputs.all):
            need = c.tensors[unit.name].rows_nbytes(unit.row_start, unit.row_end)
            if j == len(buffers):
                buffers.append(torch.empty(0, dtype=torch.uint8))
            if buffers[j].numel() < need:
                buffers[j] = torch.empty(need, dtype=torch.uint8)
        base, experts = read_unit(self.inputs, unit, policy, warnings, convert=False, buffers=buffers)
        return base, experts, warnings, check

    def prefetch(self, unit: Unit, check: bool = True) -> None:
        self._drop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergescale-read")
        self._pending = (unit, self._pool.submit(self._read, unit, self._next, check))

    def get(self, unit: Unit, warnings: list[str] | None = None, check: bool = True):
        """(base, experts) of the unit; its non-finite warnings are added to `warnings`."""
        pending = self._pending
        if pending is not None and pending[0] == unit:
            self._pending = None
            base, experts, warns, checked = pending[1].result()
            if check and not checked:  # prefetched for a caller that checks itself; this one does not
                tiles = ([base] if base is not None else []) + experts
                check_finite(self.inputs, unit, tiles, self.on_nonfinite, warns)
        else:
            self._drop()
            base, experts, warns, _ = self._read(unit, self._next, check)
        self._next ^= 1
        if warnings is not None:
            warnings.extend(warns)
        return base, experts

    def stream(self, units: list[Unit], warnings: list[str] | None = None, then: Unit | None = None,
               check: bool = True):
        """Yield (unit, base, experts) for each unit, reading the next one meanwhile (after the last: `then`)."""
        for i, unit in enumerate(units):
            base, experts = self.get(unit, warnings, check)
            following = units[i + 1] if i + 1 < len(units) else then
            if following is not None:
                self.prefetch(following, check)
            yield unit, base, experts

    def _drop(self) -> None:
        if self._pending is not None:
            wait([self._pending[1]])  # its buffers are about to be reused; its outcome does not matter
            self._pending = None

    def close(self) -> None:
        self._drop()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"

