"""Reading the rows of a unit from every model, and the non-finite policy that applies to them.

`read_unit` maps (or reads) one unit's rows from the base and every expert; `UnitReader` does it one unit ahead
of the caller on a thread; `check_finite` applies config.on_nonfinite, naming the model, tensor and file.
torch loads only when a tensor is made: `UnitReader(raw=True)` hands out the mapped bytes as numpy arrays.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np

from mergescale.merge import kernels
from mergescale.merge.input_digests import InputDigests, unit_digest
from mergescale.errors import MergeInputError
from mergescale.merge.inputs import MergeInputs, Unit

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def all_finite(t: torch.Tensor) -> bool:
    """True iff every value of a float tensor is finite. A float sum is NaN or inf whenever any term is (NaN and inf
    propagate through every addition order), so one cheap reduction in the stored dtype settles the common case;
    only a non-finite sum (a bad value, or an overflow of the sum itself) pays for the exact elementwise check.
    bf16/float32 tiles on the CPU take a compiled scan of the exponent bits instead (several times faster)."""
    import torch

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
    import torch

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
    import torch

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


def count_nonfinite(tile) -> int:
    """NaN/inf values in a merged tile: a torch tensor, or a flat numpy array of bf16 bits (uint16) or float32 (the
    fused kernels' output, merge/kernel_path.py)."""
    if isinstance(tile, np.ndarray):
        if tile.dtype in (np.uint16, np.float32):
            return kernels.count_nonfinite_raw(tile.reshape(-1))
        return int(np.count_nonzero(~np.isfinite(tile))) if np.issubdtype(tile.dtype, np.floating) else 0
    import torch

    if not tile.is_floating_point():
        return 0
    tile = tile.cpu()
    bad = kernels.count_nonfinite(tile)
    return bad if bad is not None else int((~torch.isfinite(tile)).sum())


def check_merged(config, unit: Unit, tile, warnings: list[str] | None) -> None:
    """The non-finite policy (config.on_nonfinite) for a unit's merged rows: finite inputs can still merge to NaN
    or inf when the arithmetic overflows (a large lambda or weight, a float16 output). The fused kernels check
    their inputs, not their results, so this looks at every merged value, at memory speed
    (kernels.count_nonfinite_raw), on the writer's thread."""
    bad = count_nonfinite(tile)
    if not bad:
        return
    msg = (f"the merge produced {bad} non-finite values (NaN/inf) in tensor {unit.name!r} (rows {unit.row_start}-"
           f"{unit.row_end}): its arithmetic overflowed (parameters {config.parameters}, expert weights "
           f"{config.weights}, out_dtype {config.out_dtype or 'as the base'}), or non-finite inputs were merged")
    if config.on_nonfinite == "error":
        raise MergeInputError(msg + "; set on_nonfinite: warn to write them anyway")
    log.warning(msg)
    if warnings is not None:
        warnings.append(msg)


def checked_writes(config, write, warnings: list[str] | None):
    """`write(unit, tile)` for merged tiles that pass `check_merged` first."""

    def checked(unit: Unit, tile):
        check_merged(config, unit, tile, warnings)
        return write(unit, tile)

    return checked


class UnitReader:
    """Reads units (`read_unit`, stored dtype) one ahead of the caller, on a thread. read='mmap' maps them from the
    page cache (no copy: ~4x less CPU than `preadv` on cached files, which on a small node is CPU the kernels
    need); read='pread' copies them into two sets of raw buffers used in turn (a fresh 64 MB tile per model and
    unit would cost more in page faults than the read itself).

    `get(unit)`'s tiles stay valid until the next `get`. `prefetch(unit)` starts the read the caller will ask for
    next; a prefetch that turns out wrong (a Ray actor's hint of its next batch, which another actor took) is
    waited out and dropped, its errors and warnings with it (whoever merges that unit reads it again).

    check=False skips the non-finite scan (a pass over every byte) for a caller that applies `check_finite`
    itself only when it needs to: the fused kernels detect non-finite inputs as they compute.

    raw=True (with read='mmap'; no check): each unit comes as (base or None, experts) of flat uint8 numpy arrays,
    the rows' stored bytes (`Checkpoint.map_bytes`), for merge/kernel_path.py, which never loads torch.

    `digests` (merge.input_digests.InputDigests): a unit read for the first time in this run is hashed on the
    reading thread, and `get` adds its digest there (raising InputsChanged if it differs from a recorded one)."""

    def __init__(self, inputs: MergeInputs, on_nonfinite: str, read: str = "mmap", raw: bool = False,
                 digests: InputDigests | None = None):
        if read not in ("mmap", "pread"):
            raise ValueError(f"read must be 'mmap' or 'pread', got {read!r}")
        if raw and read != "mmap":
            raise ValueError("UnitReader(raw=True) maps rows: it needs read='mmap'")
        self.inputs, self.on_nonfinite, self.mapped, self.raw = inputs, on_nonfinite, read == "mmap", raw
        self._slots: list[list[torch.Tensor]] = [[], []]
        self._next = 0  # the slot the next read goes into (the caller holds the other one)
        self._pending = None  # (unit, future of (base, experts, warnings, checked, digest or None))
        self._pool: ThreadPoolExecutor | None = None
        self.digests = digests

    def _read(self, unit: Unit, slot: int, check: bool = True):
        base, experts, warnings, check = self._read_tiles(unit, slot, check)
        digest = None
        if self.digests is not None and self.digests.wants(unit.id):
            digest = unit_digest(([base] if base is not None else []) + list(experts))
        return base, experts, warnings, check, digest

    def _read_tiles(self, unit: Unit, slot: int, check: bool):
        warnings, policy = [], self.on_nonfinite if check else "ignore"
        if self.raw:
            if check:
                raise ValueError("UnitReader(raw=True) does not check for non-finite values: pass check=False")
            tiles = [c.map_bytes(unit.name, unit.row_start, unit.row_end) for c in self.inputs.all]
            base, experts = (tiles[0], tiles[1:]) if self.inputs.base is not None else (None, tiles)
            return base, experts, warnings, check
        if self.mapped:
            base, experts = read_unit(self.inputs, unit, policy, warnings, convert=False, mapped=True)
            return base, experts, warnings, check
        import torch

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
            base, experts, warns, checked, digest = pending[1].result()
            if check and not checked:  # prefetched for a caller that checks itself; this one does not
                tiles = ([base] if base is not None else []) + experts
                check_finite(self.inputs, unit, tiles, self.on_nonfinite, warns)
        else:
            self._drop()
            base, experts, warns, _, digest = self._read(unit, self._next, check)
        if digest is not None:
            self.digests.add(unit, digest)
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
