"""Reading the rows of a unit from every model, and the non-finite policy that applies to them and to what the merge
makes of them.

A unit's rows come as their stored bytes: one flat uint8 numpy array per model, base first (`MergeInputs.all`),
mapped from the page cache or read into reused buffers (`UnitReader`, one unit ahead of the caller on a thread).
The kernels read them as they are; the torch definitions view them as tensors (no copy). `check_finite` applies
config.on_nonfinite, naming the model, tensor and file. No torch here unless a dtype without a numpy twin needs it.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING

import numpy as np

from mergescale.errors import MergeInputError
from mergescale.merge import kernels
from mergescale.merge.input_digests import InputDigests, unit_digest
from mergescale.merge.inputs import MergeInputs, Unit

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# stored float dtypes numpy can test for NaN/inf itself (bf16 and float32: the kernels' scan, at memory speed)
_NUMPY_FLOATS = {"F16": np.float16, "F64": np.float64}


def read_rows(inputs: MergeInputs, unit: Unit, mapped: bool,
              buffers: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The stored bytes of the unit's rows in every model (base first): mapped, or read into `buffers` (one uint8
    array per model, reused when large enough)."""
    return [c.row_bytes(unit.name, unit.row_start, unit.row_end, mapped, buffers[j] if buffers is not None else None)
            for j, c in enumerate(inputs.all)]


def count_nonfinite_bytes(raw: np.ndarray, code: str) -> int:
    """NaN/inf values among stored bytes of float dtype `code`."""
    if code in kernels.RAW_CODES:
        return kernels.count_nonfinite(raw.view(kernels.RAW_CODES[code]))
    if code in _NUMPY_FLOATS:
        return int(np.count_nonzero(~np.isfinite(raw.view(_NUMPY_FLOATS[code]))))
    import torch

    from mergescale.checkpoint.read import torch_dtype

    return int((~torch.isfinite(torch.from_numpy(raw).view(torch_dtype(code)).to(torch.float32))).sum())


def check_finite(inputs: MergeInputs, unit: Unit, raws: list[np.ndarray], on_nonfinite: str,
                 warnings: list[str] | None = None) -> None:
    """Apply the non-finite policy to a unit's rows (base first, as `inputs.all`): an error naming the model and
    tensor, or a warning with on_nonfinite='warn'; 'ignore' checks nothing."""
    if on_nonfinite == "ignore":
        return
    for c, raw in zip(inputs.all, raws, strict=True):
        info = c.tensors[unit.name]
        bad = count_nonfinite_bytes(raw, info.dtype) if info.is_float else 0
        if not bad:
            continue
        msg = (f"{c.path}: tensor {unit.name!r} (rows {unit.row_start}-{unit.row_end}, file "
               f"{info.file.name}) has {bad} non-finite values (NaN/inf)")
        if on_nonfinite == "error":
            raise MergeInputError(msg + "; set on_nonfinite: warn to merge anyway")
        log.warning(msg)
        if warnings is not None:
            warnings.append(msg)


def count_nonfinite(tile) -> int:
    """NaN/inf values in a merged tile: a torch tensor, or a flat numpy array of bf16 bits (uint16) or float32 (the
    fused kernels' output), or of a non-float tensor's bytes (uint8, nothing to count)."""
    if isinstance(tile, np.ndarray):
        if tile.dtype in (np.uint16, np.float32):
            return kernels.count_nonfinite(tile.reshape(-1))
        return int(np.count_nonzero(~np.isfinite(tile))) if np.issubdtype(tile.dtype, np.floating) else 0
    import torch

    if not tile.is_floating_point():
        return 0
    tile = tile.cpu().contiguous().reshape(-1)
    if tile.dtype == torch.bfloat16:
        return kernels.count_nonfinite(tile.view(torch.int16).numpy().view(np.uint16))
    if tile.dtype == torch.float32:
        return kernels.count_nonfinite(tile.numpy())
    return int((~torch.isfinite(tile)).sum())


def check_merged(config, unit: Unit, tile, warnings: list[str] | None) -> None:
    """The non-finite policy (config.on_nonfinite) for a unit's merged rows: finite inputs can still merge to NaN
    or inf when the arithmetic overflows (a large lambda or weight, a float16 output). The fused kernels check
    their inputs, not their results, so this looks at every merged value, at memory speed, on the writer's
    thread."""
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
    """Reads units (`read_rows`) one ahead of the caller, on a thread. read='mmap' maps them from the page cache (no
    copy: several times less CPU than `preadv` on cached files, which on a small node is CPU the kernels need);
    read='pread' copies them into two sets of buffers used in turn (a fresh tile per model and unit would cost more
    in page faults than the read itself).

    `get(unit)`'s rows stay valid until the next `get`. `prefetch(unit)` starts the read the caller will ask for
    next; a prefetch that turns out wrong (a Ray actor's hint of its next batch, which another actor took) is
    waited out and dropped, its errors and warnings with it (whoever merges that unit reads it again).

    check=False skips the non-finite scan (a pass over every byte) for a caller that applies `check_finite`
    itself only when it needs to: the fused kernels detect non-finite inputs as they compute.

    `digests` (merge.input_digests.InputDigests): a unit read for the first time in this run is hashed on the
    reading thread, and `get` adds its digest there (raising InputsChanged if it differs from a recorded one)."""

    def __init__(self, inputs: MergeInputs, on_nonfinite: str, read: str = "mmap", digests: InputDigests | None = None):
        if read not in ("mmap", "pread"):
            raise ValueError(f"read must be 'mmap' or 'pread', got {read!r}")
        self.inputs, self.on_nonfinite, self.mapped = inputs, on_nonfinite, read == "mmap"
        self._slots: list[list[np.ndarray]] = [[], []]
        self._next = 0  # the slot the next read goes into (the caller holds the other one)
        self._pending = None  # (unit, future of (rows, warnings, checked, digest or None))
        self._pool: ThreadPoolExecutor | None = None
        self.digests = digests

    def _read(self, unit: Unit, slot: int, check: bool = True):
        warnings: list[str] = []
        raws = read_rows(self.inputs, unit, self.mapped, None if self.mapped else self._buffers(unit, slot))
        if check:
            check_finite(self.inputs, unit, raws, self.on_nonfinite, warnings)
        digest = unit_digest(raws) if self.digests is not None and self.digests.wants(unit.id) else None
        return raws, warnings, check, digest

    def _buffers(self, unit: Unit, slot: int) -> list[np.ndarray]:
        buffers = self._slots[slot]
        for j, c in enumerate(self.inputs.all):
            need = c.tensors[unit.name].rows_nbytes(unit.row_start, unit.row_end)
            if j == len(buffers):
                buffers.append(np.empty(0, np.uint8))
            if buffers[j].size < need:
                buffers[j] = np.empty(need, np.uint8)
        return buffers

    def prefetch(self, unit: Unit, check: bool = True) -> None:
        self._drop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mergescale-read")
        self._pending = (unit, self._pool.submit(self._read, unit, self._next, check))

    def get(self, unit: Unit, warnings: list[str] | None = None, check: bool = True) -> list[np.ndarray]:
        """The unit's rows (stored bytes per model, base first); its non-finite warnings are added to `warnings`."""
        pending = self._pending
        if pending is not None and pending[0] == unit:
            self._pending = None
            raws, warns, checked, digest = pending[1].result()
            if check and not checked:  # prefetched for a caller that checks itself; this one does not
                check_finite(self.inputs, unit, raws, self.on_nonfinite, warns)
        else:
            self._drop()
            raws, warns, _, digest = self._read(unit, self._next, check)
        if digest is not None:
            self.digests.add(unit, digest)
        self._next ^= 1
        if warnings is not None:
            warnings.extend(warns)
        return raws

    def stream(self, units: list[Unit], warnings: list[str] | None = None, then: Unit | None = None,
               check: bool = True):
        """Yield (unit, rows) for each unit, reading the next one meanwhile (after the last: `then`)."""
        for i, unit in enumerate(units):
            raws = self.get(unit, warnings, check)
            following = units[i + 1] if i + 1 < len(units) else then
            if following is not None:
                self.prefetch(following, check)
            yield unit, raws

    def _drop(self) -> None:
        if self._pending is not None:
            wait([self._pending[1]])  # its buffers are about to be reused; its outcome does not matter
            self._pending = None

    def close(self) -> None:
        self._drop()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def tensors_of(inputs: MergeInputs, unit: Unit, raws: list[np.ndarray]) -> list[torch.Tensor]:
    """The rows as torch tensors of their stored dtypes and shapes, viewing the bytes (no copy)."""
    from mergescale.checkpoint.read import as_tensor

    return [as_tensor(c.tensors[unit.name], unit.row_start, unit.row_end, raw) for c, raw in zip(inputs.all, raws)]
