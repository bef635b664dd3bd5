"""What a resumed merge proves before it trusts work a killed run left: the input bytes are the ones that work
was made from.

A partial output keeps, for every unit it journaled and every unit its statistics passes read, the digest of that
unit's input rows: xxh3-128 of each model's stored bytes of the rows, base first. The reader hashes a unit the
first time a run reads it (merge.reader.UnitReader), on its reading thread, from the pages it has just mapped: no
extra I/O, and xxh3 is the fastest full-content hash at hand (it releases the GIL and runs at memory speed; sha256
and blake3 are several times slower; docs/BENCHMARKS.md, "Resume proof"). What it costs is that memory read: a
second pass over the inputs' bytes in RAM beside the kernels' own, which a CPU-bound merge on a small node pays
in wall time (measured there) and a merge waiting on its storage hardly at all. Digests of whole files taken up
front would read every input byte once more before merging (a terabyte for 64B x 8); folding the digest into the
fused kernels, which read every byte anyway, would remove the second pass over RAM (not done: it touches every
kernel).

A resumed run then proves every recorded digest before it commits:
- the journaled units first, before any new work: their rows are read and hashed again (the one cost of the proof,
  a read of what the killed run had merged, without the math or the writes that resuming saves);
- the units the statistics passes read (whose thresholds the rest of the merge uses) as the merge pass reads them.
A digest that differs means the inputs changed since the killed run: the partial output is discarded and the merge
starts over, with a log line naming the model, tensor and rows. Cheaper tests cannot prove the same: file sizes
and safetensors headers (what the run key compares) stay the same when an expert is replaced by other weights
of the same layout, and modification times can be copied along with the bytes (`cp -p`, `rsync -t`).

Within one run a unit is hashed once (a global TIES merge reads each unit in its statistics pass and again in its
merge pass, and hashes it in the first), so an input rewritten during a single run is not caught here: that is
what `read: pread` is for.
"""

from __future__ import annotations

import numpy as np
import xxhash

from mergescale.errors import InputsChanged
from mergescale.merge.inputs import MergeInputs, Unit

DIGEST_BYTES = 16  # per model


def unit_digest(tiles) -> bytes:
    """xxh3-128 of each tile's bytes (numpy arrays or CPU tensors, as read: base first), concatenated."""
    out = []
    for t in tiles:
        if not isinstance(t, np.ndarray):  # a torch tensor: its bytes, without a copy
            import torch

            t = t.reshape(-1).view(torch.uint8).numpy()
        out.append(xxhash.xxh3_128_digest(memoryview(t.reshape(-1)).cast("B")))
    return b"".join(out)


class InputDigests:
    """The input digests of a merge's units: those a partial output recorded (`recorded`) and those this process
    computed (`fresh`). `add` compares a unit's digest as read now with the recorded one."""

    def __init__(self, inputs: MergeInputs, recorded: dict[int, bytes] | None = None):
        self.inputs = inputs
        self.recorded: dict[int, bytes] = dict(recorded or {})
        self.fresh: set[int] = set()

    def wants(self, unit_id: int) -> bool:
        """Whether a read of this unit should hash it (not yet hashed in this run)."""
        return unit_id not in self.fresh

    def add(self, unit: Unit, digest: bytes) -> None:
        """Record a unit's digest as read now; InputsChanged if a recorded one differs."""
        old = self.recorded.get(unit.id)
        if old is not None and old != digest:
            raise InputsChanged(self.describe_change(unit, old, digest))
        self.recorded[unit.id] = digest
        self.fresh.add(unit.id)

    def merge_recorded(self, more: dict[int, bytes], units: dict[int, Unit]) -> None:
        """Add recorded digests from another record of the same partial output (journal and statistics)."""
        for uid, d in more.items():
            old = self.recorded.setdefault(uid, d)
            if old != d:
                raise InputsChanged(self.describe_change(units[uid], old, d))

    def of(self, unit_ids) -> dict[int, bytes]:
        return {u: self.recorded[u] for u in unit_ids}

    def unproven(self) -> set[int]:
        """Recorded digests no read of this run has confirmed yet."""
        return set(self.recorded) - self.fresh

    def describe_change(self, unit: Unit, old: bytes, new: bytes) -> str:
        n = len(self.inputs.all)
        if len(old) != len(new) or len(old) != n * DIGEST_BYTES:
            return (f"the recorded input digest of tensor {unit.name!r} rows {unit.row_start}-{unit.row_end}"
                    " is malformed")
        roles = ["base"] if self.inputs.base is not None else []
        roles += [f"expert {i}" for i in range(len(self.inputs.experts))]
        changed = [f"{role} ({c.tensors[unit.name].file})" for j, (role, c) in enumerate(zip(roles, self.inputs.all))
                   if old[j * DIGEST_BYTES:(j + 1) * DIGEST_BYTES] != new[j * DIGEST_BYTES:(j + 1) * DIGEST_BYTES]]
        return (f"tensor {unit.name!r} rows {unit.row_start}-{unit.row_end} of {', '.join(changed)} are not the "
                "bytes an earlier read of them saw")
