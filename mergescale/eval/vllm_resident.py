"""A vLLM engine kept loaded across merges: the vllm backend's `LLM`, loaded once from the base, whose weights each
merge replaces in place (merge.push.PushOutput is the merge's side; eval.resident.ResidentModel the hf one).

The weights go through vLLM's own loading path, in its engine process: `PushWorker` is a worker extension
(`LLM(worker_extension_cls=...)`) whose methods `LLM.collective_rpc` calls by name, so no function is pickled.
A push opens vLLM's layerwise reload (`initialize_layerwise_reload`), hands each HF tensor to the model's
`load_weights` as soon as the merge has produced all its rows (vLLM maps q/k/v, gate/up onto its fused qkv_proj,
gate_up_proj and re-runs each layer's post-load processing once the layer is complete: on CPU that repacks the
GEMM weights), and closes it (`finalize_layerwise_reload`); then the prefix cache is reset. The caller holds one
tensor's rows at a time, the engine at most the layers vLLM is assembling.

The check reads back what the engine computes with, per HF tensor: its rows of the fused parameter and, where the
layer multiplies through a packed copy (vLLM's CPU GEMMs drop the parameter itself), the weight read back through
that GEMM on an identity matrix (x @ W^T with x = I is W^T: one exact product per output, the rest exact zeros).
Both sides compare the tensor as the engine's dtype holds it with the sign of zero dropped (an identity GEMM may
give +0 for -0, which scores alike). Only a single worker (tensor_parallel_size 1) unquantized engine is pushed
into: the read-back reassembles each HF tensor from one worker's fused parameters.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from mergescale.checkpoint.read import Checkpoint, torch_dtype
from mergescale.eval.backends import EvalError
from mergescale.eval.resident import Resident, as_tensor, tensor_bytes

log = logging.getLogger(__name__)
EXTENSION = f"{__name__}.PushWorker"


def canonical(t: torch.Tensor) -> torch.Tensor:
    """`t` with -0.0 as +0.0 (IEEE: -0 + 0 = +0), every other value unchanged."""
    return t + 0 if t.is_floating_point() else t


class VLLMResident(Resident):
    """The push target over a VLLMBackend started with `worker_extension_cls=EXTENSION` from `base_dir`."""

    def __init__(self, backend, base_dir, base_label: str = "base"):
        super().__init__(backend, base_label)
        config = backend.llm.llm_engine.vllm_config
        par = config.parallel_config
        if par.tensor_parallel_size * par.pipeline_parallel_size != 1:
            raise EvalError("backend vllm: a merge is pushed into a single-worker engine only (tensor and pipeline "
                            "parallel size 1); evaluate the written checkpoint instead")
        if config.model_config.quantization is not None:
            raise EvalError(f"backend vllm: the engine is quantized ({config.model_config.quantization}); a merge "
                            "is pushed into an unquantized engine only")
        self.dtype = config.model_config.dtype
        with Checkpoint(base_dir) as base:  # what the engine loaded: a push must set all of it
            self.base = {n: tuple(t.shape) for n, t in base.tensors.items()}
        self.shapes: dict[str, tuple] = {}
        self.pending: dict[str, list] = {}  # tensor -> [its bytes, bytes received]
        self.held: dict[str, str] | None = None
        self.open = False  # a layerwise reload is open in the engine

    def _rpc(self, method: str, *args):
        return self.backend.llm.collective_rpc(method, args=args)[0]

    # -- the push target (merge.push) --------------------------------------------------------------------------
    def begin(self, plan_tensors: list[tuple[str, tuple]]) -> None:
        for name, shape in plan_tensors:
            if name not in self.base:
                raise KeyError(f"tensor {name}: the merge produces it but the resident engine's base has no such "
                               "tensor; its architecture differs from the merge's")
            if self.base[name] != tuple(shape):
                raise KeyError(f"tensor {name}: the merge produces shape {list(shape)}, the resident engine's base "
                               f"has {list(self.base[name])}")
        left = sorted(set(self.base) - {n for n, _ in plan_tensors})
        if left:
            raise KeyError(f"tensor {left[0]} (and {len(left) - 1} more) of the resident engine's base is not in the "
                           "merge: it would keep the base's values")
        problem = self._rpc("mergescale_push_begin", [[n, list(s)] for n, s in plan_tensors])
        if problem:
            raise KeyError(problem)
        self.fingerprint, self.open, self.held = None, True, None
        self.shapes, self.pending = {n: tuple(s) for n, s in plan_tensors}, {}

    def exact(self, name: str, code: str) -> bool:
        return False  # every tensor is checked as held: in the engine's dtype, zeros unsigned

    def as_held(self, name: str, data: np.ndarray, code: str) -> memoryview:
        return tensor_bytes(canonical(as_tensor(data, code).to(self.dtype)))

    def load_rows(self, name: str, row_start: int, data: np.ndarray, code: str) -> None:
        """Collect the tensor's rows; the whole tensor goes to the engine as soon as all of them are here."""
        shape = self.shapes[name]
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        size = torch_dtype(code).itemsize * int(np.prod(shape, dtype=np.int64))
        entry = self.pending.setdefault(name, [bytearray(size), 0])
        start = row_start * (size // shape[0]) if shape else 0
        entry[0][start:start + raw.nbytes] = raw.data
        entry[1] += raw.nbytes
        if entry[1] == size:
            del self.pending[name]
            self._rpc("mergescale_push_tensor", name, code, list(shape), entry[0])

    def held_digests(self, ranges: dict[str, list[tuple[int, int]]], codes: dict) -> dict:
        """Close the push and read everything back (as held: `codes` are all None here, `exact` being False)."""
        if self.pending:  # a tensor never completed: nothing matches, and fail() aborts the open reload
            return {}
        held = self._rpc("mergescale_push_end", {n: [list(r) for r in rows] for n, rows in ranges.items()})
        self.open = False
        self.backend.llm.reset_prefix_cache()
        return held

    def fail(self) -> None:
        super().fail()
        self.pending.clear()
        if self.open:  # close the engine's reload: its next push starts a fresh one
            self.open = False
            try:
                self._rpc("mergescale_push_abort")
            except Exception as e:  # noqa: BLE001 - the engine may be gone; it scores nothing either way
                log.warning("closing a failed push in the vLLM engine: %s", e)


class PushWorker:
    """vLLM worker extension: the engine side of a push (`self` is vLLM's worker)."""

    def mergescale_push_begin(self, tensors: list) -> str | None:
        """Where each HF tensor lives in vLLM's model; a layerwise reload opened. A message naming the tensor
        that cannot be placed (nothing opened then), or None."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        layout = _layout(model, {n: tuple(s) for n, s in tensors})
        if isinstance(layout, str):
            return layout
        self.mergescale_layout = layout
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)
        return None

    def mergescale_push_tensor(self, name: str, code: str, shape: list, data: bytes) -> None:
        from vllm.config import set_current_vllm_config

        tensor = torch.frombuffer(bytearray(data), dtype=torch_dtype(code)).reshape(shape)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights([(name, tensor)])

    def mergescale_push_end(self, ranges: dict[str, list]) -> dict[str, list[str]]:
        """Close the reload (vLLM processes any layer left); per HF tensor, the sha256 of each of its row ranges as
        the engine holds them."""
        self._mergescale_finalize()
        model = self.model_runner.get_model()
        dtype = self.vllm_config.model_config.dtype
        gemm: dict[str, torch.Tensor] = {}
        out = {}
        with torch.inference_mode():
            for name, (module_name, param, offset, shape) in self.mergescale_layout.items():
                views = _held(model.get_submodule(module_name), module_name, param, shape, dtype, gemm)
                copies = [_digests(v, offset, shape, dtype, ranges.get(name, [])) for v in views]
                out[name] = [d[0] if len(set(d)) == 1 else f"copies that differ ({sorted(set(d))})"
                             for d in zip(*copies)]
        return out

    def mergescale_push_abort(self) -> None:
        self._mergescale_finalize()

    def _mergescale_finalize(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)


def _layout(model, shapes: dict[str, tuple]) -> dict | str:
    """HF tensor -> (vLLM module, parameter, first row in it, HF shape), through the model's public name mapping
    (`hf_to_vllm_mapper`) and its fused modules' member order (`packed_modules_mapping`: q, k, v rows stacked in
    qkv_proj); a message naming the tensor where that does not place it."""
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", None) or {}
    out = {}
    for name, shape in shapes.items():
        mapped = mapper.map_name(name) if mapper is not None else name
        if mapped is None:
            return f"tensor {name}: vLLM's {type(model).__name__} does not load it; a push could not set it"
        module_name, _, param = mapped.rpartition(".")
        try:
            model.get_submodule(module_name)
        except AttributeError:
            return f"tensor {name}: vLLM's {type(model).__name__} has no module {module_name} to load it into"
        offset, fused = 0, module_name.rpartition(".")[2]
        if fused in packed:
            hf_module, _, hf_param = name.rpartition(".")
            prefix, _, member = hf_module.rpartition(".")
            if member not in packed[fused]:
                return f"tensor {name}: vLLM loads it into {module_name}, whose parts are {packed[fused]}"
            for before in packed[fused][:packed[fused].index(member)]:
                sibling = f"{prefix}.{before}.{hf_param}"
                if sibling not in shapes:
                    return f"tensor {name}: vLLM stacks it after {sibling} in {module_name}; the merge has no {sibling}"
                offset += shapes[sibling][0]
        out[name] = (module_name, param, offset, shape)
    return out


def _held(module, module_name: str, param: str, shape: tuple, dtype, gemm: dict) -> list[torch.Tensor]:
    """The copies of `module.param` the engine computes with: the parameter (unless a CPU GEMM dropped it) and, for
    a weight multiplied through a packed copy, that copy read back through the layer's GEMM."""
    views = []
    held = getattr(module, param, None)
    if held is not None and held.numel() > 0:
        views.append(held.detach())
    if param == "weight" and hasattr(module, "cpu_linear") and len(shape) == 2:
        if module_name not in gemm:
            eye = torch.eye(shape[1], dtype=dtype)
            gemm[module_name] = module.quant_method.apply(module, eye, None).t()
        views.append(gemm[module_name])
    if not views:
        raise RuntimeError(f"{module_name}.{param}: vLLM's module holds no readable copy of it")
    return views


def _digests(held: torch.Tensor, offset: int, shape: tuple, dtype, ranges: list) -> list[str]:
    """sha256 of rows [r0, r1) of the HF tensor stacked at `offset` in `held`, per range."""
    rows = shape[0] if shape else 1
    part = held.reshape(-1)[:1] if not shape else held[offset:offset + rows]
    if tuple(part.shape) != (tuple(shape) or (1,)):
        return [f"a slice of shape {list(part.shape)}, not {list(shape)}"] * len(ranges)
    part = canonical(part.to(dtype))
    return [hashlib.sha256(tensor_bytes(part if not shape else part[r0:r1])).hexdigest() for r0, r1 in ranges]
