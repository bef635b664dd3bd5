"""A merge pushed into a resident model instead of written to disk: the output the driver's merge_into hands the
merge pass in place of checkpoint.write.PartialOutput.

Each unit's merged rows (their bytes in the output dtype, in unit order) are hashed per tensor and copied into the
target's parameter at once; nothing holds more than one tile beside the target's own copy. At commit the target
hashes what it holds and every tensor's digest must equal the merge's, else PushMismatch names the tensor: a model
that is not the merge is never scored. The pushed model's fingerprint (`weights_fingerprint`) is a hash of those
per-tensor digests, so a result cache keyed by it can never serve the base's or another merge's scores.

The target (eval.resident.ResidentModel) provides:
    begin(plan_tensors)                    check the names and shapes against what it holds; nothing loaded yet
    load_rows(name, row_start, data, code) copy rows (flat bytes of safetensors dtype `code`) into tensor `name`
    exact(name, code) -> bool              whether values of dtype `code` survive the round trip through `name`
    as_held(name, data, code) -> bytes     the rows as it will hold them (where it rounds them)
    digest(name, code | None)              sha256 of what it holds of `name`, converted back to `code`
                                           (None: as held)
    commit(fingerprint) / fail()           the model is the merge `fingerprint` now / is no model to score
"""

from __future__ import annotations

import hashlib
import json

from mergescale.checkpoint.write import tile_bytes
from mergescale.errors import MergeInputError


class PushMismatch(RuntimeError):
    """A pushed tensor's checksum on the target differs from the merge's: the target holds something else."""


def weights_fingerprint(digests: dict[str, str]) -> str:
    """The pushed model's identity: the per-tensor sha256 of its bytes (name order)."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()[:32]


class PushOutput:
    """The merge pass's output as pushed rows (the PartialOutput methods the driver and LocalRunner call)."""

    dir = None

    def __init__(self, target):
        self.target = target
        self.codes: dict[str, str] = {}
        self.produced: dict = {}  # tensor -> sha256 of the bytes merged, in unit order
        self.checked: dict = {}  # what the target should hold, where it rounds the rows

    def start(self, config, plan) -> None:
        """Before any row: the target checks that it holds exactly the plan's tensors (names, shapes)."""
        self.codes = dict(plan.out_dtypes)
        try:
            self.target.begin([(t.name, tuple(t.shape)) for t in plan.tensors])
        except KeyError as e:
            raise MergeInputError(str(e.args[0])) from None
        self.produced = {t.name: hashlib.sha256() for t in plan.tensors}
        self.checked = {n: hashlib.sha256() for n, c in self.codes.items() if not self.target.exact(n, c)}

    # -- what the driver calls on a PartialOutput: no resume, nothing durable -----------------------------------
    def open(self, resume: bool = True) -> dict:
        return {}

    def load_stats(self, parse):
        return None

    def save_stats(self, stats: dict, digests: dict) -> None:
        pass

    def mark_done(self, entries: dict) -> None:
        pass

    def write_rows(self, name: str, row_start: int, tile) -> int:
        """Hash the unit's rows (on the writer thread, in unit order) and copy them into the target."""
        data = tile_bytes(tile)
        code = self.codes[name]
        self.produced[name].update(memoryview(data))
        if name in self.checked:
            self.checked[name].update(self.target.as_held(name, data, code))
        self.target.load_rows(name, row_start, data, code)
        return data.nbytes

    def commit(self, metadata_source, manifest: dict, config_updates: dict | None = None,
               overwrite: bool = False) -> dict:
        """Every tensor's checksum on the target against the merge's; the manifest with the pushed digests."""
        digests = {n: h.hexdigest() for n, h in self.produced.items()}
        for name, code in self.codes.items():
            want = self.checked[name].hexdigest() if name in self.checked else digests[name]
            got = self.target.digest(name, None if name in self.checked else code)
            if got != want:
                self.target.fail()
                raise PushMismatch(f"pushed tensor {name}: the model holds bytes with sha256 {got[:16]}..., the merge "
                                   f"produced {want[:16]}...; the pushed model is not the merge and is not scored")
        fingerprint = weights_fingerprint(digests)
        self.target.commit(fingerprint)
        # metadata_source: the config and tokenizer the merged model has (what the written checkpoint would copy)
        return {**manifest, "pushed": {"fingerprint": fingerprint, "metadata_source": str(metadata_source),
                                       "tensors": digests}}

    def close(self) -> None:
        self.target.fail()  # part of a merge was pushed: no model to score until the next complete push

    abort = close
