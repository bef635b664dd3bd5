"""Which kernel computes what a method declares (methods.Kernel), on which tiles, and what "not handled" means.

Every entry point takes flat numpy arrays of the stored bytes' dtype (RAW_CODES: bf16 as its uint16 bits, or
float32), base first, and returns False / None when it does not handle the unit: no numba, a method without
that kernel, no base where the kernel needs one, or a non-finite value (NaN and inf are what the torch
definition alone defines). The caller (mergescale.merge.pipeline) then runs the torch definition: never a
different result, only a slower one.

One launch at a time per process (`_launches_kernels`), on numba's workqueue threading layer unless the user
picked one. numba is imported on first use: importing this package is light.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading

import numpy as np

RAW_CODES = {"BF16": np.uint16, "F32": np.float32}  # stored dtypes (safetensors codes) the kernels read and write
NUMBA = importlib.util.find_spec("numba") is not None  # a dependency, but e.g. a bare GPU image may lack it


@functools.cache
def _kernels():
    """(merging, primitives, selection, ties): the numba modules, imported (and their kernels loaded or compiled)
    on first use, so that importing this package costs neither numba nor LLVM."""
    from mergescale.merge.kernels import merging, primitives, selection, ties

    return merging, primitives, selection, ties


def available() -> bool:
    return NUMBA


_LAUNCH = threading.Lock()


def _launches_kernels(fn):
    """Entry points that launch parallel kernels: one launch at a time per process, on numba's `workqueue`
    threading layer unless the user picked one (NUMBA_THREADING_LAYER).

    The default OpenMP layer's threads spin-wait after every kernel (libgomp's default policy; the runtime is
    torch's, so OMP_WAIT_POLICY cannot be changed for it alone once torch is imported), which took CPU from the
    reader and writer threads of a merge on a small node (docs/BENCHMARKS.md). workqueue threads sleep between
    kernels but must not be entered by two threads at once: hence the lock."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LAUNCH:
            _choose_layer()
            return fn(*args, **kwargs)

    return wrapper


def _choose_layer() -> None:
    """Before numba starts its threads (the first parallel launch or set_num_threads), pick workqueue."""
    import numba
    from numba.np.ufunc import parallel

    if "NUMBA_THREADING_LAYER" not in os.environ and not getattr(parallel, "_is_initialized", False):
        numba.config.THREADING_LAYER = "workqueue"


def set_threads(n: int) -> None:
    """Threads the kernels use in this process (a Ray actor sets its CPU share)."""
    if NUMBA:
        import numba

        _choose_layer()
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _kernel(method, merge: bool = False, magnitudes: bool = False):
    """The method's kernel declaration if it has what is asked for and numba is here, else None."""
    k = method.kernel
    if not NUMBA or k is None or (merge and k.merge is None) or (magnitudes and not k.magnitudes):
        return None
    return k


@_launches_kernels
def merge(method, params, weights: list[float], ctx, models: tuple, has_base: bool, dst: np.ndarray) -> bool:
    """Merge a unit with the method's fused kernel into `dst` (the output dtype's flat array); False: not here."""
    k = _kernel(method, merge=True)
    if k is None or (k.merge != "average" and not has_base) or dst.shape[0] == 0:
        return False
    return _kernels()[0].merge(k.merge, float(k.dare(params)), params, weights, ctx, models, has_base, dst)


@_launches_kernels
def select_and_merge(method, params, ctx, models: tuple, dst: np.ndarray, ks: list[int]) -> list[float] | None:
    """TIES of a unit whose thresholds (the ks[j]-th smallest magnitude of expert j) are not known yet, in one pass
    (kernels.ties.select_and_merge): the thresholds, or None (not here, or the sample's brackets missed)."""
    k = _kernel(method, merge=True)
    if k is None or k.merge != "ties":
        return None
    return _kernels()[3].select_and_merge(float(k.dare(params)), params, ctx, models, dst, ks)


@_launches_kernels
def bracketed_tile(method, params, ctx, models: tuple, dst: np.ndarray, lo, hi, share: float):
    """One unit of a tensor split into several, merged against its brackets (kernels.ties.bracketed_tile; the
    listed elements' indices are the tensor's); None: not here."""
    k = _kernel(method, merge=True)
    if k is None or k.merge != "ties":
        return None
    return _kernels()[3].bracketed_tile(float(k.dare(params)), params, ctx, models, dst, lo, hi, share,
                                        ctx.element_offset)


@_launches_kernels
def finish_bracketed(params, name: str, lo, hi, ks: list[int], parts: list, dst: np.ndarray) -> list[float] | None:
    """The exact thresholds of a tensor merged by `bracketed_tile`, and the redo of its listed elements in `dst`
    (all its rows); None: a bracket missed."""
    return _kernels()[3].finish_bracketed(params, name, lo, hi, ks, parts, dst)


@_launches_kernels
def histograms(method, params, ctx, models: tuple, windows: list[list]):
    """Selection counts of a unit's magnitudes per expert and window (kernels.selection.histograms); None: not
    here."""
    k = _kernel(method, magnitudes=True)
    return None if k is None else _kernels()[2].histograms(float(k.dare(params)), ctx, models, windows)


@_launches_kernels
def magnitudes(method, params, ctx, models: tuple) -> np.ndarray | None:
    """[expert, element] magnitudes of a unit, as the method's torch `magnitudes`; None: not here."""
    k = _kernel(method, magnitudes=True)
    return None if k is None else _kernels()[2].magnitudes(float(k.dare(params)), ctx, models)


def count_nonfinite(flat: np.ndarray) -> int:
    """Number of NaN/inf values in a flat contiguous array of bf16 bits (uint16) or float32."""
    bits = flat.view(np.uint32) if flat.dtype == np.float32 else flat
    if not NUMBA:
        mask = 0x7F80 if bits.dtype == np.uint16 else 0x7F800000
        return int(np.count_nonzero((bits & mask) == mask))
    return _kernels()[1].count_nonfinite(bits)


def warm_up(n_experts: int, dtype: str = "BF16", out_dtype: str | None = None, methods: list[str] | None = None,
            selection: bool = True) -> None:
    """Compile every kernel (or those of `methods`) for tiles of this stored dtype (a RAW_CODES code) and expert
    count, or load them from numba's on-disk cache, so that a timed merge does not pay for compilation; a fresh
    install's first merge otherwise does it on the way. selection=False: only the merge kernels, not the
    threshold-finding ones (a merge without a threshold to find never runs them). Needs no torch."""
    if not NUMBA:
        return
    from mergescale.merge.methods import METHODS, UnitContext
    from mergescale.merge.selection import RADIX, window_around

    selection_kernels = _kernels()[2]
    n = 8 * selection_kernels.SAMPLE_RUNS * selection_kernels.SAMPLE_RUN + 1  # large enough for the sampled bracket
    rng = np.random.default_rng(0)
    base32 = rng.standard_normal(n, dtype=np.float32)
    models32 = [base32] + [base32 + np.float32(0.01) * rng.standard_normal(n, dtype=np.float32)
                           for _ in range(n_experts)]

    def stored(a: np.ndarray, code: str) -> np.ndarray:  # bf16 by truncation: any finite values will do here
        return (a.view(np.uint32) >> 16).astype(np.uint16) if code == "BF16" else a.astype(RAW_CODES[code])

    models = tuple(stored(m, dtype) for m in models32)
    dst = np.empty(n, RAW_CODES[out_dtype or dtype])
    ctx = UnitContext("warm_up", (n,), 0, thresholds=[{"min": 0.01}] * n_experts)
    chosen = [m for name, m in METHODS.items() if methods is None or name in methods]
    for m in chosen:
        merge(m, m.params(), [1.0] * n_experts, ctx, models, True, dst)
    dst[:5] = np.array(np.inf, np.float32).view(np.uint32) >> 16 if dst.dtype == np.uint16 else np.inf
    count_nonfinite(dst)  # the merged-tile scan (reader.check_merged), both of its steps
    if not selection:
        return
    for m in chosen:
        if m.kernel is not None and m.kernel.magnitudes:
            params = m.params.model_validate({"density": 0.5})
            histograms(m, params, ctx, models, [[RADIX] for _ in models[1:]])
            histograms(m, params, ctx, models, [[RADIX.refine(7), window_around(0.5, 0.6)] for _ in models[1:]])
            select_and_merge(m, params, ctx, models, dst, [n // 2] * n_experts)
