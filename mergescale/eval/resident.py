"""A model kept loaded across merges: the hf backend's module, loaded once from the base, whose parameters each
merge overwrites in place (merge.push.PushOutput is the merge's side).

Every tensor of a merge's plan is pushed, merged or copied, and the module may hold nothing else (but tensors tied
to a pushed one, and buffers computed from the config), so nothing of the base or of an earlier merge survives a
push. Rows arrive in the merge's output dtype and are converted as from_pretrained converts them from disk (a
`copy_` into the parameter's dtype), so a pushed model scores bitwise as the written checkpoint loaded from disk.
A push that fails part way leaves no model to score (`require` raises) until the next complete one.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

from mergescale.checkpoint.read import torch_dtype
from mergescale.eval.backends import EvalError

# dtypes each dtype holds exactly: a round trip through them gives back the same bytes
_HOLDS = {torch.float32: {torch.float32, torch.bfloat16, torch.float16}}


class Resident:
    """What every push target shares: `fingerprint`, the pushed merge's (merge.push.weights_fingerprint) once a push
    is complete and checked; "base" before any; None from a push's first row until it is checked, and after a failed
    push. `require` guards every scoring."""

    def __init__(self, backend, base_label: str = "base"):
        self.backend = backend
        self.fingerprint: str | None = base_label
        self.pushes = 0

    def commit(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.pushes += 1

    def fail(self) -> None:
        self.fingerprint = None

    def require(self, fingerprint: str) -> None:
        """EvalError unless this model is the checked push `fingerprint`: nothing else is scored under its name."""
        if self.fingerprint != fingerprint:
            state = "a push that did not complete" if self.fingerprint is None else f"model {self.fingerprint}"
            raise EvalError(f"the resident model holds {state}, not the merge {fingerprint}; nothing is scored")


class ResidentModel(Resident):
    """The push target over an HFBackend's module (`backend.model`)."""

    def __init__(self, backend, base_label: str = "base"):
        super().__init__(backend, base_label)
        self.tensors = dict(backend.model.state_dict(keep_vars=True))

    # -- the push target (merge.push) --------------------------------------------------------------------------
    def begin(self, plan_tensors: list[tuple[str, tuple]]) -> None:
        """KeyError naming the tensor unless the plan's tensors are this module's (names, shapes) and cover every
        tensor it holds; nothing is changed here."""
        mine = self.tensors
        for name, shape in plan_tensors:
            if name not in mine:
                raise KeyError(f"tensor {name}: the merge produces it but the resident model (loaded from the base) "
                               "has no such parameter; its architecture differs from the merge's")
            if tuple(mine[name].shape) != tuple(shape):
                raise KeyError(f"tensor {name}: the merge produces shape {list(shape)}, the resident model holds "
                               f"{list(mine[name].shape)}")
        pushed = {mine[n].data_ptr() for n, _ in plan_tensors}
        left = [n for n, t in mine.items() if t.data_ptr() not in pushed]
        if left:
            raise KeyError(f"tensor {left[0]} (and {len(left) - 1} more) of the resident model is not in the merge: "
                           "it would keep the base's values")
        self.fingerprint = None  # from the first row on, the module is no model until the push is checked

    def exact(self, name: str, code: str) -> bool:
        held, out = self.tensors[name].dtype, torch_dtype(code)
        return held == out or out in _HOLDS.get(held, ())

    def load_rows(self, name: str, row_start: int, data: np.ndarray, code: str) -> None:
        target = self.tensors[name].detach()  # the parameter's storage
        src = as_tensor(data, code)
        with torch.no_grad():
            if target.dim() == 0:
                target.copy_(src.reshape(()))
                return
            rows = src.numel() // max(1, target[0].numel())
            target[row_start:row_start + rows].copy_(src.reshape(rows, *target.shape[1:]))

    def as_held(self, name: str, data: np.ndarray, code: str) -> memoryview:
        return tensor_bytes(as_tensor(data, code).to(self.tensors[name].dtype))

    def held_digests(self, ranges: dict[str, list[tuple[int, int]]], codes: dict[str, str | None]) -> dict:
        out = {}
        for name, rows in ranges.items():
            held = self.tensors[name].detach()
            if codes.get(name) is not None:
                held = held.to(torch_dtype(codes[name]))
            out[name] = [hashlib.sha256(tensor_bytes(held if held.dim() == 0 else held[r0:r1])).hexdigest()
                         for r0, r1 in rows]
        return out


def as_tensor(data: np.ndarray, code: str) -> torch.Tensor:
    """`data`'s bytes as a flat tensor of dtype `code`, no copy. Rows a Ray actor sent are read-only (the object
    store's memory): only ever a source here, so torch's warning about writing to them does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).view(torch_dtype(code))


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
