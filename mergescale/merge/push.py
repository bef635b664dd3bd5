"""A merge pushed into a resident model instead of written to disk: the output the driver's merge_into hands the
merge pass in place of checkpoint.write.PartialOutput.

Each unit's merged rows (their bytes in the output dtype) are hashed where they were merged (this process, or the
Ray merge actor that made them) and copied into the target's parameter as they arrive, in any order; nothing holds
more than a batch of tiles beside the target's own copy. At commit the target hashes what it holds, unit by unit,
and every unit's digest must equal the merge's, else PushMismatch names the tensor and rows: a model that is not
the merge (a row corrupted in transit, a unit never delivered) is never scored.

A tensor's digest is the sha256 of its units' sha256 digests (32 bytes each, in row order): one value however the
units were spread over processes, and the same for any number of actors (units depend on the plan's tile, never on
who merges them). The pushed model's fingerprint (`weights_fingerprint`) is a hash of those per-tensor digests, so a
result cache keyed by it can never serve the base's or another merge's scores.

The target (eval.resident.ResidentModel, eval.vllm_resident.VLLMResident) provides:
    begin(plan_tensors)                    check the names and shapes against what it holds; nothing loaded yet
    load_rows(name, row_start, data, code) copy rows (flat bytes of safetensors dtype `code`) into tensor `name`
    exact(name, code) -> bool              whether values of dtype `code` survive the round trip through `name`
    as_held(name, data, code) -> bytes     the rows as it will hold them (where it rounds them)
    held_digests(ranges, codes)            {tensor: [sha256 hex of rows [r0, r1) of what it holds, per range]},
                                           converted back to codes[tensor] (None: as held)
    commit(fingerprint) / fail()           the model is the merge `fingerprint` now / is no model to score
"""

from __future__ import annotations

import hashlib
import json

from mergescale.checkpoint.write import tile_bytes
from mergescale.errors import MergeInputError


class PushMismatch(RuntimeError):
    """A pushed unit's checksum on the target differs from the merge's: the target holds something else."""


def tensor_digest(unit_digests: list[bytes]) -> str:
    """A tensor's digest from its units' sha256 digests in row order."""
    return hashlib.sha256(b"".join(unit_digests)).hexdigest()


def weights_fingerprint(digests: dict[str, str]) -> str:
    """The pushed model's identity: the per-tensor digests (name order)."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()[:32]


class PushOutput:
    """The merge pass's output as pushed rows (the PartialOutput methods the driver and its runners call)."""

    dir = None

    def __init__(self, target):
        self.target = target
        self.codes: dict[str, str] = {}
        self.ranges: dict[str, list[tuple[int, int]]] = {}  # tensor -> its units' rows, in row order
        self.rounds: set[str] = set()  # tensors the target holds in another dtype: checked as it holds them
        self.produced: dict[tuple[str, int], bytes] = {}  # (tensor, first row) -> sha256 of the unit's merged bytes
        self.checked: dict[tuple[str, int], bytes] = {}  # the same, as the target will hold them (self.rounds)

    def start(self, config, plan) -> None:
        """Before any row: the target checks that it holds exactly the plan's tensors (names, shapes)."""
        self.codes = dict(plan.out_dtypes)
        try:
            self.target.begin([(t.name, tuple(t.shape)) for t in plan.tensors])
        except KeyError as e:
            raise MergeInputError(str(e.args[0])) from None
        self.ranges = {t.name: [] for t in plan.tensors}
        for u in plan.units:
            self.ranges[u.name].append((u.row_start, u.row_end))
        for rows in self.ranges.values():
            rows.sort()
        self.rounds = {n for n, c in self.codes.items() if not self.target.exact(n, c)}
        self.produced, self.checked = {}, {}

    # -- what the driver calls on a PartialOutput: no resume, nothing durable -----------------------------------
    def open(self, resume: bool = True) -> dict:
        return {}

    def load_stats(self, parse):
        return None

    def save_stats(self, stats: dict, digests: dict) -> None:
        pass

    def mark_done(self, entries: dict) -> None:
        pass

    def write_rows(self, name: str, row_start: int, tile, digest: bytes | None = None) -> int:
        """Copy a unit's rows into the target, in any order. `digest`: the sha256 of the rows where they were
        merged (a Ray actor), so that what happens to them in transit is checked too; None: hashed here."""
        data = tile_bytes(tile)
        code = self.codes[name]
        self.produced[(name, row_start)] = digest if digest is not None else hashlib.sha256(data).digest()
        # A target that rounds a tensor is checked against the rounding of the rows as they arrive, which cannot
        # tell rows changed in transit: check those against the merge's digest here.
        arrived = hashlib.sha256(data).digest() if name in self.rounds and digest is not None else digest
        if arrived != digest:
            self.target.fail()
            end = next(r1 for r0, r1 in self.ranges[name] if r0 == row_start)
            raise PushMismatch(f"pushed tensor {name} rows {row_start}-{end}: the rows that arrived have sha256 "
                               f"{arrived.hex()[:16]}..., the merge produced {digest.hex()[:16]}...; the pushed "
                               "model is not the merge and is not scored")
        if name in self.rounds:
            self.checked[(name, row_start)] = hashlib.sha256(self.target.as_held(name, data, code)).digest()
        self.target.load_rows(name, row_start, data, code)
        return data.nbytes

    def commit(self, metadata_source, manifest: dict, config_updates: dict | None = None,
               overwrite: bool = False) -> dict:
        """Every unit's checksum on the target against the merge's; the manifest with the pushed digests."""
        codes = {n: None if n in self.rounds else c for n, c in self.codes.items()}
        held = self.target.held_digests(self.ranges, codes)
        digests = {}
        for name, ranges in self.ranges.items():
            want = self.checked if name in self.rounds else self.produced
            got = held.get(name) or []
            for i, (r0, r1) in enumerate(ranges):
                w = want.get((name, r0))
                g = got[i] if i < len(got) else "nothing"
                if w is None or g != w.hex():
                    self.target.fail()
                    made = "never delivered" if w is None else f"produced {w.hex()[:16]}..."
                    raise PushMismatch(f"pushed tensor {name} rows {r0}-{r1}: the model holds sha256 {g[:16]}..., the "
                                       f"merge {made}; the pushed model is not the merge and is not scored")
            digests[name] = tensor_digest([self.produced[(name, r0)] for r0, _ in ranges])
        fingerprint = weights_fingerprint(digests)
        self.target.commit(fingerprint)
        # metadata_source: the config and tokenizer the merged model has (what the written checkpoint would copy)
        return {**manifest, "pushed": {"fingerprint": fingerprint, "metadata_source": str(metadata_source),
                                       "tensors": digests}}

    def close(self) -> None:
        self.target.fail()  # part of a merge was pushed: no model to score until the next complete push

    abort = close
