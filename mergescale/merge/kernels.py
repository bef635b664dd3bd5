"""Fused CPU kernels: the hot methods' math from methods.py compiled with numba, one pass over the raw tiles.

methods.py is the definition: pure torch functions, readable, used on accelerators and for anything not here.
On the CPU, ATen runs a TIES merge as ~40 separate passes over float32 copies of every tile (and DARE's hash as
~25 more), which made a 2-core merge compute-bound at ~8x its I/O time. These kernels read bf16/float32 tiles
as stored, do every step for one element in registers, and write the output dtype directly; numba spreads the
elements over the process's threads.

Bit for bit: each kernel performs exactly the float32 (or float64) operations of the torch function it replaces,
in the same order, rounding each step (numba's default: no fast-math, so no reassociation and no FMA
contraction). tests/test_kernels.py checks every kernel against methods.py with torch.equal. Where the torch
path special-cases non-finite values (TIES's fast path, NaN payloads, bf16 NaN encoding), a kernel reports
"not finite" and the caller reruns that unit with methods.py.

Without numba (it is a dependency, but e.g. a bare GPU image may lack it) everything falls back to methods.py.
One module on purpose (~500 lines): the kernels share their load/store/hash helpers and the sub-block layout, and
the Python side below is only their dispatch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from mergescale.merge.masks import stream_keys

log = logging.getLogger(__name__)

try:  # pragma: no branch
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised on images without numba
    numba = None

HI_BINS, LO_BINS = 1 << 15, 1 << 16  # as mergescale.merge.selection
RAW_DTYPES = {torch.bfloat16: np.uint16, torch.float32: np.float32}  # stored dtypes the kernels read directly
BLOCK = 1 << 14  # elements per parallel work item
SAMPLE_RUN = 64  # consecutive elements per sample run (bracket selection)
HIST_ITEMS = 8  # most private histogram copies per call (see `histograms`)


def available() -> bool:
    return numba is not None


def set_threads(n: int) -> None:
    """Threads the kernels use in this process (a Ray actor sets its CPU share)."""
    if numba is not None:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


if numba is not None:
    _jit = njit(parallel=True, nogil=True, cache=True)
    _jit_serial = njit(nogil=True, cache=True)

    def _load(a, i):  # float32 value of element i of a raw tile (bf16 stored as uint16, or float32)
        pass

    @overload(_load, inline="always")
    def _load_impl(a, i):
        if a.dtype == types.uint16:
            return lambda a, i: np.uint32(np.uint32(a[i]) << np.uint32(16)).view(np.float32)
        return lambda a, i: a[i]

    def _store(a, i, v):  # write float32 v as the output dtype
        pass

    @overload(_store, inline="always")
    def _store_impl(a, i, v):
        if a.dtype == types.uint16:
            def store_bf16(a, i, v):
                # round to nearest even, as c10::BFloat16 (finite values only: callers reject NaN)
                u = np.float32(v).view(np.uint32)
                a[i] = np.uint16(np.uint32(u + ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)) >> np.uint32(16))
            return store_bf16

        def store_f32(a, i, v):
            a[i] = v
        return store_f32

    @njit(inline="always")
    def _sign(x):  # torch.sign for floats: (0 < x) - (x < 0)
        return np.float32(x > 0) - np.float32(x < 0)

    @intrinsic
    def _mix32(typingctx, x):
        """lowbias32 (masks._mix32) of the low 32 bits of an integer, as 32-bit LLVM operations: numba would widen
        each product to 64 bits, which vectorizes at half the width (2x slower DARE hashing)."""
        if not isinstance(x, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            v = args[0]
            v = builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v
            for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
                v = builder.xor(v, builder.lshr(v, i32(shift)))
                if mult is not None:
                    v = builder.mul(v, i32(mult))
            return v

        return types.uint32(x), codegen

    # The kernels work on sub-blocks of SUB elements laid out as [expert, element] scratch rows, and every inner
    # loop runs over arrays sliced to the sub-block and indexed from 0: LLVM then vectorizes them (offset indices
    # into whole tiles defeat it, 5x slower), and per-element branches (DARE or not, trim or not, which sign
    # rule) become per-row ones.
    SUB = 512

    @njit(inline="always")
    def _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk):
        """brow[:m] = base, tr[j, :m] = tau_j of elements s0..s0+m (DARE'd as methods.dare: (e - b) * keep * f32(1 / (1 - p))
        when asked); chk[:m] += tau * 0, which is NaN exactly where some tau is not finite."""
        bs, bw, c = b[s0:s0 + m], brow[:m], chk[:m]
        for i in range(m):
            bw[i] = _load(bs, i)
        for j in range(len(e)):
            es, row = e[j][s0:s0 + m], tr[j, :m]
            for i in range(m):
                row[i] = _load(es, i) - bw[i]
            if dare:
                kj1, kj2, idx0 = np.uint32(k1[j]), np.uint32(k2[j]), first + np.uint64(s0)
                for i in range(m):
                    idx = idx0 + np.uint64(i)  # the element's flat index in its tensor
                    h = _mix32(np.uint32(idx & np.uint64(0xFFFFFFFF)) ^ kj1)
                    h = _mix32(h ^ np.uint32(idx >> np.uint64(32)) ^ kj2)
                    row[i] = row[i] * np.float32(h >= dare_thr) * scale
            for i in range(m):
                c[i] += row[i] * np.float32(0.0)

    @njit(inline="always")
    def _finite(chk):
        ok = True
        for i in range(chk.shape[0]):
            ok &= chk[i] == 0.0
        return ok

    @_jit
    def _linear_kernel(b, e, w, lam, dare, dare_thr, k1, k2, first, scale, out, bad):
        """task_arithmetic / dare_linear: b + lam * (((t_0 w_0) + t_1 w_1) + ...)."""
        n = b.shape[0]
        ne = len(e)
        for blk in prange((n + BLOCK - 1) // BLOCK):
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            acc_ = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), SUB):
                m = min(SUB, n - s0)
                _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
                acc, row, w0 = acc_[:m], tr[0, :m], w[0]
                for i in range(m):
                    acc[i] = row[i] * w0
                for j in range(1, ne):
                    row, wj = tr[j, :m], w[j]
                    for i in range(m):
                        acc[i] += row[i] * wj
                bw, c, os = brow[:m], chk[:m], out[s0:s0 + m]
                for i in range(m):
                    v = bw[i] + lam * acc[i]
                    c[i] += v * np.float32(0.0)
                    _store(os, i, v)
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _average_kernel(e, w, normalize, inv_wsum, out, bad):
        """average: float64 sum_i w_i e_i (* 1 / sum w), rounded once to float32."""
        n = e[0].shape[0]
        ne = len(e)
        for blk in prange((n + BLOCK - 1) // BLOCK):
            acc_ = np.empty(SUB, np.float64)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), SUB):
                m = min(SUB, n - s0)
                acc, es, w0 = acc_[:m], e[0][s0:s0 + m], w[0]
                for i in range(m):
                    acc[i] = np.float64(_load(es, i)) * w0
                for j in range(1, ne):
                    es, wj = e[j][s0:s0 + m], w[j]
                    for i in range(m):
                        acc[i] += np.float64(_load(es, i)) * wj
                if normalize:
                    for i in range(m):
                        acc[i] *= inv_wsum
                c, os = chk[:m], out[s0:s0 + m]
                for i in range(m):
                    v = np.float32(acc[i])
                    c[i] += v * np.float32(0.0)
                    _store(os, i, v)
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _ties_kernel(b, e, thr, lam, count_sign, dare, dare_thr, k1, k2, first, scale, out, bad):
        """ties / dare_ties: methods._ties_update_fast on (DARE'd) task vectors, then b + lam * update."""
        n = b.shape[0]
        ne = len(e)
        for blk in prange((n + BLOCK - 1) // BLOCK):
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            gamma_ = np.empty(SUB, np.float32)
            total_ = np.empty(SUB, np.float32)
            count_ = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), SUB):
                m = min(SUB, n - s0)
                _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
                for j in range(ne):
                    th = thr[j]
                    if th > 0.0:  # min(sign(|t| - thr) + 1, 1): the keep mask as 0/1, multiplied in as torch does
                        row = tr[j, :m]
                        for i in range(m):
                            row[i] = row[i] * min(_sign(abs(row[i]) - th) + np.float32(1.0), np.float32(1.0))
                gamma, total, count = gamma_[:m], total_[:m], count_[:m]
                row = tr[0, :m]
                if count_sign:
                    for i in range(m):
                        gamma[i] = _sign(row[i])
                    for j in range(1, ne):
                        row = tr[j, :m]
                        for i in range(m):
                            gamma[i] += _sign(row[i])
                else:
                    for i in range(m):
                        gamma[i] = row[i]
                    for j in range(1, ne):
                        row = tr[j, :m]
                        for i in range(m):
                            gamma[i] += row[i]
                for i in range(m):
                    gamma[i] = _sign(gamma[i])
                    total[i] = 0.0
                    count[i] = 0.0
                for j in range(ne):
                    row = tr[j, :m]
                    for i in range(m):
                        x = max(row[i] * gamma[i], np.float32(0.0))
                        total[i] += x
                        count[i] += _sign(x)
                bw, os = brow[:m], out[s0:s0 + m]
                for i in range(m):
                    _store(os, i, bw[i] + lam * (total[i] / max(count[i], np.float32(1.0)) * gamma[i]))
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _hist_kernel(b, e, dare, dare_thr, k1, k2, first, scale, pass2, buckets, out, bad):
        """Selection histograms of |tau_j| (or |DARE(tau_j)|) for every expert in one pass.

        Pass 1: out[t, j] counts the high 16 bits. Pass 2: out[t, j*nq+q] counts the low 16 bits of values whose
        high bits equal buckets[j, q] (-1: none), nq = buckets.shape[1]. out[t] is private to work item t."""
        n = b.shape[0]
        ne = len(e)
        nq = buckets.shape[1]
        T = out.shape[0]
        per = (((n + T - 1) // T + SUB - 1) // SUB) * SUB
        for th in prange(T):
            h = out[th]
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)
            bits_ = np.empty(SUB, np.int32)
            sel = np.empty(SUB + 1, np.int32)
            for s0 in range(th * per, min(n, (th + 1) * per), SUB):
                m = min(SUB, n - s0)
                _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
                bits = bits_[:m]
                for j in range(ne):
                    row = tr[j, :m]
                    for i in range(m):
                        bits[i] = np.float32(abs(row[i])).view(np.int32)
                    if not pass2:
                        hj = h[j]
                        for i in range(m):
                            hj[bits[i] >> 16] += 1
                        continue
                    for q in range(nq):
                        bq = buckets[j, q]
                        if bq < 0:
                            continue
                        c = 0
                        for i in range(m):  # compact the (few) values of the bucket, branch-free, then count them
                            sel[c] = bits[i]
                            c += (bits[i] >> 16) == bq
                        hq = h[j * nq + q]
                        for i in range(c):
                            hq[sel[i] & 0xFFFF] += 1
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _sample_kernel(b, e, dare, dare_thr, k1, k2, first, scale, step, out, bad):
        """out[j, s*SAMPLE_RUN:(s+1)*SAMPLE_RUN] = |tau_j| of the run of elements starting at s * step."""
        ne = len(e)
        runs = out.shape[1] // SAMPLE_RUN
        for s in prange(runs):
            tr = np.empty((ne, SAMPLE_RUN), np.float32)
            brow = np.empty(SAMPLE_RUN, np.float32)
            chk = np.zeros(SAMPLE_RUN, np.float32)
            _task_rows(b, e, s * step, SAMPLE_RUN, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
            for j in range(ne):
                o, row = out[j, s * SAMPLE_RUN:(s + 1) * SAMPLE_RUN], tr[j]
                for i in range(SAMPLE_RUN):
                    o[i] = abs(row[i])
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _bracket_kernel(b, e, dare, dare_thr, k1, k2, first, scale, lo, hi, counts, cand, bad):
        """Per expert j and work item t, with a = |tau_j|: counts[t, j] = #(a < lo), #(a == lo), #(lo < a < hi),
        #(a == hi); the values strictly inside go to cand[t, j, :] (counted also past its end: the caller checks)."""
        n = b.shape[0]
        ne = len(e)
        T = counts.shape[0]
        cap = cand.shape[2]
        per = (((n + T - 1) // T + SUB - 1) // SUB) * SUB
        for th in prange(T):
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(th * per, min(n, (th + 1) * per), SUB):
                m = min(SUB, n - s0)
                _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
                for j in range(ne):
                    row, lj, hj = tr[j, :m], lo[j], hi[j]
                    nb, nl, nin, nh = 0, 0, 0, 0
                    for i in range(m):  # vectorized counts; values inside are rare, so collect only when present
                        a = abs(row[i])
                        nb += a < lj
                        nl += a == lj
                        nin += (a > lj) & (a < hj)
                        nh += a == hj
                    counts[th, j, 0] += nb
                    counts[th, j, 1] += nl
                    counts[th, j, 3] += nh
                    c = counts[th, j, 2]
                    if nin and c + m <= cap:
                        dst = cand[th, j]
                        for i in range(m):  # branch-free compaction (dst has room for all m)
                            a = abs(row[i])
                            dst[c] = a
                            c += (a > lj) & (a < hj)
                    else:
                        c += nin  # past the buffer's end: counted only, the caller falls back
                    counts[th, j, 2] = c
            if not _finite(chk):
                bad[0] = 1

    @_jit_serial
    def _count_nonfinite_bf16(a):
        bad = 0
        for i in range(a.shape[0]):
            bad += (a[i] & np.uint16(0x7F80)) == np.uint16(0x7F80)
        return bad

    @_jit_serial
    def _count_nonfinite_f32(a):
        bad = 0
        for i in range(a.shape[0]):
            bad += (a[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
        return bad


# ------------------------------------------------------------------------------------------------------------
# Python side: raw views of tiles, dispatch, and the fallback contract (None = use methods.py)


def _raw(tiles: list[torch.Tensor]) -> tuple | None:
    """Flat numpy views of CPU tiles sharing one stored dtype the kernels read, else None."""
    if any(t.device.type != "cpu" for t in tiles):
        return None
    dtypes = {t.dtype for t in tiles}
    if len(dtypes) != 1:
        return None
    dt = dtypes.pop()
    if dt not in RAW_DTYPES:
        return None
    flat = [t.reshape(-1) for t in tiles]
    if dt == torch.bfloat16:
        return tuple(f.view(torch.int16).numpy().view(np.uint16) for f in flat)
    return tuple(f.numpy() for f in flat)


def _out_view(out: torch.Tensor):
    if out.dtype == torch.bfloat16:
        return out.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    if out.dtype == torch.float32:
        return out.reshape(-1).numpy()
    return None


def _dare_args(p: float, seed: int, name: str, n_experts: int, element_offset: int):
    """(dare?, threshold, k1s, k2s, first, 1/(1-p) as float32): the mask of masks.dare_keep_mask, element for element."""
    if p <= 0.0:
        z = np.zeros(n_experts, np.uint32)
        return False, np.uint32(0), z, z, np.uint64(0), np.float32(1.0)
    keys = [stream_keys(seed, i, name) for i in range(n_experts)]
    return (True, np.uint32(min(int(round(p * 2**32)), 2**32 - 1)), np.array([k[0] for k in keys], np.uint32),
            np.array([k[1] for k in keys], np.uint32), np.uint64(element_offset), np.float32(1.0 / (1.0 - p)))


def _dare_p(method: str, params) -> float:
    return float(params.p) if method in ("dare_linear", "dare_ties") else 0.0


MERGE_KERNELS = ("average", "task_arithmetic", "dare_linear", "ties", "dare_ties")
MAGNITUDE_KERNELS = ("ties", "dare_ties", "breadcrumbs")  # their `magnitudes` are |tau| or |DARE(tau)|


def merge_tile(method: str, params, weights: list[float], ctx, base, experts, out: torch.Tensor) -> bool:
    """Merge a whole unit into `out` (its final dtype) with a fused kernel. False: not handled here (no numba,
    a method or dtype without a kernel, or values whose non-finite handling only methods.py defines)."""
    if numba is None or method not in MERGE_KERNELS:
        return False
    uses_base = method != "average"
    if uses_base and base is None:
        return False
    models = _raw(([base] if uses_base else []) + list(experts))
    dst = _out_view(out)
    if models is None or dst is None or out.numel() == 0:
        return False
    bad = np.zeros(1, np.uint8)
    if method == "average":
        w = np.array(weights, np.float64)
        _average_kernel(models, w, bool(params.normalize), 1.0 / float(sum(weights)), dst, bad)
        return not bad[0]
    b, e = models[0], models[1:]
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, len(e), ctx.element_offset)
    lam = np.float32(params.lambda_)
    if method in ("task_arithmetic", "dare_linear"):
        _linear_kernel(b, e, np.array(weights, np.float32), lam, dare, dthr, k1, k2, first, scale, dst, bad)
    else:
        thr = np.array([t.get("min", 0.0) for t in ctx.thresholds] if ctx.thresholds else [0.0] * len(e), np.float32)
        _ties_kernel(b, e, thr, lam, params.sign == "count", dare, dthr, k1, k2, first, scale, dst, bad)
    return not bad[0]




def histograms(method: str, params, ctx, base, experts, buckets: list[list[int]] | None = None) -> list[torch.Tensor] | None:
    """Per-expert selection histograms of the method's magnitudes over a unit, as selection.hi_histogram
    (buckets None) or selection.lo_histogram (buckets[j]: the high buckets of expert j, at most 2) would sum
    them. Returns [N] int64 tensors (pass 1) or [N][len(buckets[j])] (pass 2); None: not handled here."""
    if numba is None or method not in MAGNITUDE_KERNELS or base is None:
        return None
    models = _raw([base] + list(experts))
    if models is None or any(len(bs) > 2 for bs in buckets or []):
        return None
    b, e = models[0], models[1:]
    n_e = len(e)
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, n_e, ctx.element_offset)
    # Private histograms per work item, at most HIST_ITEMS of them: on a many-core node one per thread would be
    # T x N x 65536 counters zeroed and summed for every unit (hundreds of MB at 64 threads).
    items = min(numba.get_num_threads(), HIST_ITEMS)
    nq = max([len(bs) for bs in buckets or []] + [1])
    bk = np.full((n_e, nq), -1, np.int64)  # -1 never equals a high half of |x| (those are >= 0)
    for j, bs in enumerate(buckets or []):
        bk[j, :len(bs)] = list(bs)
    out = np.zeros((items, n_e, HI_BINS) if buckets is None else (items, nq * n_e, LO_BINS), np.int64)
    bad = np.zeros(1, np.uint8)
    _hist_kernel(b, e, dare, dthr, k1, k2, first, scale, buckets is not None, bk, out, bad)
    if bad[0]:
        return None
    total = torch.from_numpy(out.sum(0))
    if buckets is None:
        return [total[j] for j in range(n_e)]
    return [[total[nq * j + q] for q in range(len(bs))] for j, bs in enumerate(buckets)]


def count_nonfinite(t: torch.Tensor) -> int | None:
    """Number of NaN/inf values in a CPU bf16/float32 tensor (exponent bits all ones); None: not handled here."""
    if numba is None or t.device.type != "cpu" or t.dtype not in RAW_DTYPES or not t.is_contiguous():
        return None
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        return int(_count_nonfinite_bf16(flat.view(torch.int16).numpy().view(np.uint16)))
    return int(_count_nonfinite_f32(flat.view(torch.int32).numpy().view(np.uint32)))


SAMPLE_RUNS = 1024  # runs of SAMPLE_RUN elements sampled per expert: 65536 magnitudes


def kth_magnitudes(method: str, params, ctx, base, experts, ks: list[int]) -> list[float] | None:
    """The ks[j]-th smallest (1-based) magnitude of expert j over one in-memory unit, exactly torch.kthvalue's
    value, in one counting pass instead of the radix select's two histogram passes.

    An evenly spaced sample (SAMPLE_RUNS runs of consecutive elements) brackets each answer between two sampled
    values, 4 standard deviations of a sample quantile's rank either side; one pass counts the values below the
    bracket and collects those inside it, and the answer is picked among those. The sample only decides how
    fast this is: if a bracket misses (counts show the rank outside it, or too many values fall inside),
    None is returned and the caller runs the radix select. None also when the kernels do not handle the unit."""
    if numba is None or method not in MAGNITUDE_KERNELS or base is None:
        return None
    models = _raw([base] + list(experts))
    if models is None:
        return None
    b, e = models[0], models[1:]
    n, n_e = b.shape[0], len(e)
    size = SAMPLE_RUNS * SAMPLE_RUN
    if n < 8 * size:
        return None
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, n_e, ctx.element_offset)
    bad = np.zeros(1, np.uint8)
    sample = np.empty((n_e, size), np.float32)
    _sample_kernel(b, e, dare, dthr, k1, k2, first, scale, (n - SAMPLE_RUN) // (SAMPLE_RUNS - 1), sample, bad)
    if bad[0]:
        return None
    sample.sort(axis=1)
    lo, hi = np.empty(n_e, np.float32), np.empty(n_e, np.float32)
    for j, k in enumerate(ks):
        pos = min(size - 1, k * size // n)
        margin = int(4 * (size * (pos + 1) / size * (1 - pos / size)) ** 0.5) + 32
        # at the ends the bracket stays open: [0, ..] and [.., inf] hold the extremes the sample may have missed
        lo[j] = sample[j, pos - margin] if pos - margin > 0 else 0.0
        hi[j] = sample[j, pos + margin] if pos + margin < size - 1 else np.inf
    threads = numba.get_num_threads()
    cap = int(n * 3 * (2 * 4 * (size / 4) ** 0.5 + 64) / size / threads) + 1024
    counts = np.zeros((threads, n_e, 4), np.int64)
    cand = np.empty((threads, n_e, cap), np.float32)
    _bracket_kernel(b, e, dare, dthr, k1, k2, first, scale, lo, hi, counts, cand, bad)
    if bad[0] or (counts[:, :, 2] > cap).any():
        return None
    out = []
    for j, k in enumerate(ks):
        below, at_lo, inside, at_hi = (int(x) for x in counts[:, j].sum(0))
        if lo[j] == hi[j]:
            inside = at_hi = 0
        if below < k <= below + at_lo:
            out.append(float(lo[j]))
        elif below + at_lo < k <= below + at_lo + inside:
            vals = np.concatenate([cand[t, j, :counts[t, j, 2]] for t in range(threads)])
            r = k - below - at_lo - 1
            out.append(float(np.partition(vals, r)[r]))
        elif below + at_lo + inside < k <= below + at_lo + inside + at_hi:
            out.append(float(hi[j]))
        else:
            log.debug("bracket missed for %s expert %d (k=%d, counts %s)", ctx.name, j, k, counts[:, j].sum(0))
            return None
    return out


def warm_up(n_experts: int, dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype | None = None) -> None:
    """Compile every kernel for tiles of this dtype and expert count (or load them from numba's on-disk cache), so
    that a timed merge does not pay for compilation; a fresh install's first merge otherwise does it on the way."""
    if numba is None:
        return
    from mergescale.merge.methods import TileContext, get_method  # methods imports this module

    n = 8 * SAMPLE_RUNS * SAMPLE_RUN + 1  # large enough for the bracket selection
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g)
    experts = [(base + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(n_experts)]
    base = base.to(dtype)
    ctx = TileContext(name="warm_up", shape=(n,), element_offset=0, thresholds=[{"min": 0.01}] * n_experts)
    out = torch.empty(n, dtype=out_dtype or dtype)
    for name in MERGE_KERNELS:
        merge_tile(name, get_method(name).params(), [1.0] * n_experts, ctx, base, experts, out)
    for name in ("ties", "dare_ties"):
        params = get_method(name).params.model_validate({"density": 0.5})
        hists = histograms(name, params, ctx, base, experts)
        histograms(name, params, ctx, base, experts, [[int(h.argmax())] for h in hists])
        kth_magnitudes(name, params, ctx, base, experts, [n // 2] * n_experts)
