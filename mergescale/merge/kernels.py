"""Fused CPU kernels: the hot methods' math from methods.py compiled with numba, one pass over the raw tiles.

methods.py is the definition: pure torch functions, readable, used on accelerators and for anything not here.
On the CPU, ATen runs a TIES merge as ~40 separate passes over float32 copies of every tile (and DARE's hash as
~25 more), which made a 2-core merge compute-bound at ~8x its I/O time. These kernels read bf16/float32 tiles
as stored, do every step for one element in registers, and write the output dtype directly; numba spreads the
elements over the process's threads.

Bit for bit: each kernel performs exactly the float32 (or float64) operations of the torch function it replaces,
in the same order, rounding each step (numba's default: no fast-math, so no reassociation and no FMA
contraction), or operations shown to round to the same bits (the per-sign sums of `_ties4`, argued there). tests/test_kernels.py checks every kernel against methods.py with torch.equal. Where the torch
path special-cases non-finite values (TIES's fast path, NaN payloads, bf16 NaN encoding), a kernel reports
"not finite" and the caller reruns that unit with methods.py.

Without numba (it is a dependency, but e.g. a bare GPU image may lack it) everything falls back to methods.py.
One module on purpose (~1,250 lines, 780 of them numba code): the kernels share their load/store/hash helpers, the
TIES row math and the sub-block layout (inlined into each kernel at compile time), and the Python side below is
only their dispatch, the sampled brackets and the fallback contract. The exact selection logic itself (windows,
passes) is mergescale.merge.selection; these kernels only count for it.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from mergescale.merge.masks import stream_keys
from mergescale.merge.methods import METHODS

if TYPE_CHECKING:
    import torch

# No torch at import: `merge_arrays` runs the linear methods' kernels on numpy arrays, which is all a Ray actor
# merging with average, task_arithmetic or dare_linear needs (merge/kernel_path.py); the torch-facing entry
# points import it as they are called.

log = logging.getLogger(__name__)

try:  # pragma: no branch
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit, prange, types
    from numba.cpython.unsafe.numbers import trailing_zeros as _cttz
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised on images without numba
    numba = None

RAW_CODES = {"BF16": np.uint16, "F32": np.float32}  # stored dtypes (safetensors codes) the kernels read directly
BLOCK = 1 << 14  # elements per parallel work item
SAMPLE_RUN = 256  # consecutive elements per sample run (bracket selection)
HIST_ITEMS = 8  # most private histogram copies per call (see `histograms`)


def available() -> bool:
    return numba is not None


_LAUNCH = threading.Lock()


def _launches_kernels(fn):
    """Entry points that launch parallel kernels: one launch at a time per process, on numba's `workqueue`
    threading layer unless the user picked one (NUMBA_THREADING_LAYER).

    The default OpenMP layer's threads spin-wait after every kernel (libgomp's default policy; the runtime is
    torch's, so OMP_WAIT_POLICY cannot be changed for it alone once torch is imported): on a 2-core machine that
    took ~1.2 CPU-s per 5 GB merge from the reader and writer threads (-20% CPU, -10 to -15% wall without it).
    workqueue threads sleep between kernels but must not be entered by two threads at once: hence the lock."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _LAUNCH:
            if numba is not None:
                _choose_layer()
            return fn(*args, **kwargs)

    return wrapper


def _choose_layer() -> None:
    """Before numba starts its threads (the first parallel launch or set_num_threads), pick workqueue."""
    from numba.np.ufunc import parallel

    if "NUMBA_THREADING_LAYER" not in os.environ and not getattr(parallel, "_is_initialized", False):
        numba.config.THREADING_LAYER = "workqueue"


def set_threads(n: int) -> None:
    """Threads the kernels use in this process (a Ray actor sets its CPU share)."""
    if numba is not None:
        _choose_layer()
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

    @intrinsic
    def _dare_hash32(typingctx, lo0, i, kj1, kh):
        """masks.uniform_bits_reference of flat index (hi << 32) + lo0 + i, given kh = hi ^ k2 and that lo0 + i does
        not wrap: mix(mix((lo0 + i) ^ k1) ^ kh), every operation on 32-bit lanes (numba would widen the add and
        the xors to 64 bits, halving the vector width)."""
        if not all(isinstance(a, types.Integer) for a in (lo0, i, kj1, kh)):
            return None

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)

            def to32(v):
                return builder.trunc(v, i32) if v.type.width > 32 else builder.zext(v, i32) if v.type.width < 32 else v

            a, b, c, d = (to32(v) for v in args)
            v = builder.xor(builder.add(a, b), c)
            for key in (None, d):
                if key is not None:
                    v = builder.xor(v, key)
                for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
                    v = builder.xor(v, builder.lshr(v, i32(shift)))
                    if mult is not None:
                        v = builder.mul(v, i32(mult))
            return v

        return types.uint32(lo0, i, kj1, kh), codegen

    # The kernels work on sub-blocks of SUB elements laid out as [expert, element] scratch rows, and every inner
    # loop runs over arrays sliced to the sub-block and indexed from 0: LLVM then vectorizes them (offset indices
    # into whole tiles defeat it, 5x slower), and per-element branches (DARE or not, trim or not, which sign
    # rule) become per-row ones.
    SUB = 512

    @njit(inline="always")
    def _tau_row(es, bw, row, m, dare, dare_thr, kj1, kj2, idx0, scale):
        """row[:m] = tau of one expert over a sub-block (es: its raw values, bw: the base's as float32), DARE'd as
        methods.dare when asked: (e - b) * keep * f32(1 / (1 - p)), idx0 the sub-block's first flat index."""
        for i in range(m):
            row[i] = _load(es, i) - bw[i]
        if dare:
            lo0 = np.uint32(idx0 & np.uint64(0xFFFFFFFF))
            if np.uint64(lo0) + np.uint64(m) <= np.uint64(1 << 32):
                # hi32 of every index is the same: all-32-bit lanes (twice as many per vector as 64-bit ones)
                kh = np.uint32(idx0 >> np.uint64(32)) ^ kj2
                for i in range(m):
                    h = _dare_hash32(lo0, i, kj1, kh)
                    row[i] = row[i] * np.float32(h >= dare_thr) * scale
            else:  # the sub-block crosses a multiple of 2**32
                for i in range(m):
                    idx = idx0 + np.uint64(i)  # the element's flat index in its tensor
                    h = _mix32(np.uint32(idx & np.uint64(0xFFFFFFFF)) ^ kj1)
                    h = _mix32(h ^ np.uint32(idx >> np.uint64(32)) ^ kj2)
                    row[i] = row[i] * np.float32(h >= dare_thr) * scale

    @njit(inline="always")
    def _base_row(b, s0, m, brow):
        bs, bw = b[s0:s0 + m], brow[:m]
        for i in range(m):
            bw[i] = _load(bs, i)
        return bw

    @njit(inline="always")
    def _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk):
        """brow[:m] = base, tr[j, :m] = tau_j of elements s0..s0+m (see _tau_row); chk[:m] += tau * 0, which is
        NaN exactly where some tau is not finite."""
        bw, c = _base_row(b, s0, m, brow), chk[:m]
        for j in range(tr.shape[0]):
            row = tr[j, :m]
            _tau_row(e[j][s0:s0 + m], bw, row, m, dare, dare_thr, np.uint32(k1[j]), np.uint32(k2[j]),
                     first + np.uint64(s0), scale)
            for i in range(m):
                c[i] += row[i] * np.float32(0.0)

    @njit(inline="always")
    def _finite(chk):
        ok = True
        for i in range(chk.shape[0]):
            ok &= chk[i] == 0.0
        return ok

    @_jit
    def _linear_kernel(b, e, ne, w, lam, dare, dare_thr, k1, k2, first, scale, out, bad):
        """task_arithmetic / dare_linear: b + lam * (((t_0 w_0) + t_1 w_1) + ...)."""
        n = b.shape[0]
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
    def _average_kernel(e, ne, b, w, normalize, inv_wsum, out, bad):
        """average: float64 sum_i w_i e_i (* 1 / sum w), rounded once to float32. The base (b, empty without one)
        is not in the formula, but its values are checked too: a kernel that succeeds has seen only finite inputs."""
        n = e[0].shape[0]
        has_base = b.shape[0] == n
        for blk in prange((n + BLOCK - 1) // BLOCK):
            acc_ = np.empty(SUB, np.float64)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), SUB):
                m = min(SUB, n - s0)
                if has_base:
                    bs, c = b[s0:s0 + m], chk[:m]
                    for i in range(m):
                        c[i] += _load(bs, i) * np.float32(0.0)
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

    # TIES on a sub-block, in two passes over each expert's tau row rather than four: the first trims, checks
    # and elects as it goes (_trim_elect), the second takes the disjoint mean (_disjoint_mean). ~25% faster than
    # one pass per step; the float operations and their order are methods._ties_update_fast's. The trim is a select
    # (|t| >= thr), where torch multiplies by a 0/1 mask: they differ only in the sign of a dropped zero, which
    # neither sign election nor max(t * gamma, 0) can tell apart.

    @njit(inline="always")
    def _trim_elect(row, c, gamma, th, count_sign, m):
        """Expert row (tau, m elements): c += tau * 0 (the finiteness check), row = tau if |tau| >= th else 0, and its
        vote added to gamma (the trimmed tau itself, or its sign with count_sign: a loop-invariant branch, which
        LLVM hoists out of the vectorized loop)."""
        for i in range(m):
            x = row[i]
            c[i] += x * np.float32(0.0)
            x = x if abs(x) >= th else np.float32(0.0)
            row[i] = x
            gamma[i] += _sign(x) if count_sign else x

    @njit(inline="always")
    def _count_trim_elect(row, c, gamma, th, count_sign, m, nlo, nle):
        """_trim_elect with threshold th, also counting |tau| < th in nlo and |tau| <= th in nle (a one-value
        bracket of _ties_kernel, in the same pass)."""
        for i in range(m):
            x = row[i]
            a = abs(x)
            c[i] += x * np.float32(0.0)
            nlo[i] += a < th
            nle[i] += a <= th
            x = x if a >= th else np.float32(0.0)
            row[i] = x
            gamma[i] += _sign(x) if count_sign else x

    @njit(inline="always")
    def _disjoint_mean(tr, m, gamma_, total_, count_):
        """gamma = sign(sum of votes); total = mean of the trimmed taus that agree with gamma, times gamma (the TIES
        update), in total_[:m]."""
        gamma, total, count = gamma_[:m], total_[:m], count_[:m]
        for i in range(m):
            gamma[i] = _sign(gamma[i])
            total[i] = 0.0
            count[i] = 0.0
        for j in range(tr.shape[0]):
            row = tr[j, :m]
            for i in range(m):
                x = max(row[i] * gamma[i], np.float32(0.0))
                total[i] += x
                count[i] += np.float32(x > 0.0)  # sign(x) for x >= 0
        for i in range(m):
            total[i] = total[i] / max(count[i], np.float32(1.0)) * gamma[i]

    @njit(inline="always")
    def _ties_rows(tr, m, thr, count_sign, gamma_, total_, count_, chk):
        """methods._ties_update_fast on the tau rows tr[:, :m] (trimmed in place): the update lands in total_[:m]."""
        gamma = gamma_[:m]
        for i in range(m):
            gamma[i] = 0.0
        for j in range(tr.shape[0]):
            _trim_elect(tr[j, :m], chk[:m], gamma, thr[j], count_sign, m)
        _disjoint_mean(tr, m, gamma_, total_, count_)

    # TIES of 3 or 4 experts without DARE (the common case) in one loop over the elements, each expert's tau and
    # the running sums in registers: no scratch rows to store and reload, ~35% less time than the passes above.
    # The disjoint mean comes from per-sign sums: with gamma = +1 the agreeing entries are the positive ones,
    # summed in expert order from +0 as max(t * gamma, 0) sums them; with gamma = -1 the negative ones, whose sum
    # is exactly minus that (rounding is symmetric), which times gamma at the end gives the same bits. Eight
    # slots in one loop did not vectorize (slower than the passes), hence 4, a 4th slot for 3 experts trimmed
    # to 0 by an infinite threshold.

    @njit(inline="always")
    def _vote(x, th, count_sign, g, P, cp, N, cn, ck):
        """One expert's tau x into the running sums: ck (x * 0, the finiteness check), g (the sign vote), P/cp and
        N/cn (sum and count of the kept positive / negative entries)."""
        ck += x * np.float32(0.0)
        x = x if abs(x) >= th else np.float32(0.0)
        g += _sign(x) if count_sign else x
        P += max(x, np.float32(0.0))
        cp += np.float32(x > 0.0)
        N += min(x, np.float32(0.0))
        cn += np.float32(x < 0.0)
        return g, P, cp, N, cn, ck

    @njit(inline="always")
    def _vote_store(os, i, bv, lam, g, P, cp, N, cn, ck):
        """os[i] = b + lam * (mean of the kept entries that agree with sign(g)); 1 if anything was not finite."""
        num = P if g > 0 else (N if g < 0 else np.float32(0.0))
        v = bv + lam * (num / max(cp if g > 0 else cn, np.float32(1.0)))
        _store(os, i, v)
        return np.int32((ck + v * np.float32(0.0)) != np.float32(0.0))

    @njit(inline="always")
    def _ties4(bs, a0, a1, a2, a3, t0, t1, t2, t3, lam, count_sign, counting, m, os, cnt):
        """TIES of one sub-block of 4 expert slots (raw tiles) into os. counting (brackets of one value, their
        value the threshold): cnt[j] += #|tau_j| < t_j and cnt[4 + j] += #|tau_j| <= t_j. 1 if anything was not
        finite."""
        z = np.float32(0.0)
        nb = np.int32(0)
        if counting:
            l0 = l1 = l2 = l3 = q0 = q1 = q2 = q3 = np.int32(0)  # int32 scalar sums vectorize; per-sub-block, no overflow
            for i in range(m):
                b = _load(bs, i)
                x0, x1, x2, x3 = _load(a0, i) - b, _load(a1, i) - b, _load(a2, i) - b, _load(a3, i) - b
                l0 += np.int32(abs(x0) < t0)
                l1 += np.int32(abs(x1) < t1)
                l2 += np.int32(abs(x2) < t2)
                l3 += np.int32(abs(x3) < t3)
                q0 += np.int32(abs(x0) <= t0)
                q1 += np.int32(abs(x1) <= t1)
                q2 += np.int32(abs(x2) <= t2)
                q3 += np.int32(abs(x3) <= t3)
                g, P, cp, N, cn, ck = _vote(x0, t0, count_sign, z, z, z, z, z, z)
                g, P, cp, N, cn, ck = _vote(x1, t1, count_sign, g, P, cp, N, cn, ck)
                g, P, cp, N, cn, ck = _vote(x2, t2, count_sign, g, P, cp, N, cn, ck)
                g, P, cp, N, cn, ck = _vote(x3, t3, count_sign, g, P, cp, N, cn, ck)
                nb |= _vote_store(os, i, b, lam, g, P, cp, N, cn, ck)
            cnt[0] += l0
            cnt[1] += l1
            cnt[2] += l2
            cnt[3] += l3
            cnt[4] += q0
            cnt[5] += q1
            cnt[6] += q2
            cnt[7] += q3
        else:
            for i in range(m):
                b = _load(bs, i)
                g, P, cp, N, cn, ck = _vote(_load(a0, i) - b, t0, count_sign, z, z, z, z, z, z)
                g, P, cp, N, cn, ck = _vote(_load(a1, i) - b, t1, count_sign, g, P, cp, N, cn, ck)
                g, P, cp, N, cn, ck = _vote(_load(a2, i) - b, t2, count_sign, g, P, cp, N, cn, ck)
                g, P, cp, N, cn, ck = _vote(_load(a3, i) - b, t3, count_sign, g, P, cp, N, cn, ck)
                nb |= _vote_store(os, i, b, lam, g, P, cp, N, cn, ck)
        return nb

    @_jit
    def _ties_kernel(b, e, ne, thr, lam, count_sign, dare, dare_thr, k1, k2, first, scale, lo, hi, below, defer, ndefer,
                     out, bad):
        """ties / dare_ties: b + lam * methods._ties_update_fast(trim(tau_j, thr_j)), tau DARE'd when asked.

        Bracketed mode (lo is not empty): the exact thresholds are not known yet, only lo_j <= thr_j <= hi_j. An
        element is trimmed the same for every such thr_j unless some lo_j <= |tau_j| <= hi_j; those elements are
        merged with thr = hi (provisionally) and their indices listed in defer[t, :ndefer[t]] for the caller to
        redo (`_ties_redo_kernel`) once the thresholds are known; below[t, j] counts |tau_j| < lo_j. An expert
        whose bracket is one value (lo_j = hi_j: bf16 task vectors take few distinct magnitudes) lists nothing:
        below[t, ne + j] counts |tau_j| <= hi_j instead, which is all it takes to confirm thr_j = lo_j. Work item
        t covers a contiguous range, so the lists concatenated over t are in ascending order."""
        n = b.shape[0]
        T = below.shape[0]
        bracket = lo.shape[0] > 0
        listing = False  # some bracket spans several values: its elements inside are listed
        for j in range(lo.shape[0]):
            listing |= lo[j] != hi[j]
        cap = defer.shape[1]
        per = (((n + T - 1) // T + SUB - 1) // SUB) * SUB
        four = (ne == 3 or ne == 4) and not dare and not listing  # _ties4: one loop, sums in registers
        th = np.full(4, np.inf, np.float32)  # its thresholds: the one-value brackets', or the known ones
        for j in range(ne if four else 0):
            th[j] = lo[j] if bracket else thr[j]
        for t in prange(T):
            if four:
                cnt = np.zeros(8, np.int64)
                nb = np.int32(0)
                for s0 in range(t * per, min(n, (t + 1) * per), SUB):
                    m = min(SUB, n - s0)
                    nb |= _ties4(b[s0:s0 + m], e[0][s0:s0 + m], e[1][s0:s0 + m], e[2][s0:s0 + m],
                                 e[3 if ne == 4 else 0][s0:s0 + m], th[0], th[1], th[2], th[3], lam, count_sign,
                                 bracket, m, out[s0:s0 + m], cnt)
                for j in range(ne if bracket else 0):
                    below[t, j] += cnt[j]
                    below[t, ne + j] += cnt[4 + j]
                if nb:
                    bad[0] = 1
                continue
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            gamma_ = np.empty(SUB, np.float32)
            total_ = np.empty(SUB, np.float32)
            count_ = np.empty(SUB, np.float32)
            flag_ = np.empty(SUB, np.int32)
            # per-lane counts (summed after the work item): a lane-wise add vectorizes, a scalar sum did not here
            nlo = np.zeros((ne, SUB), np.int32)
            nhi = np.zeros((ne, SUB), np.int32)
            chk = np.zeros(SUB, np.float32)
            for s0 in range(t * per, min(n, (t + 1) * per), SUB):
                m = min(SUB, n - s0)
                bw, ck, gamma, flag = _base_row(b, s0, m, brow), chk[:m], gamma_[:m], flag_[:m]
                for i in range(m):
                    gamma[i] = 0.0
                if listing:
                    for i in range(m):
                        flag[i] = 0
                for j in range(ne):
                    row = tr[j, :m]
                    _tau_row(e[j][s0:s0 + m], bw, row, m, dare, dare_thr, np.uint32(k1[j]), np.uint32(k2[j]),
                             first + np.uint64(s0), scale)
                    if bracket:  # counted before the trim, which uses hi provisionally
                        lj, hj, cl = lo[j], hi[j], nlo[j, :m]
                        if lj == hj:  # the threshold is lj if the counts agree: no element of it to redo
                            _count_trim_elect(row, ck, gamma, lj, count_sign, m, cl, nhi[j, :m])
                            continue
                        else:
                            for i in range(m):
                                a = abs(row[i])
                                cl[i] += a < lj
                                flag[i] |= (a >= lj) & (a <= hj)
                    _trim_elect(row, ck, gamma, hi[j] if bracket else thr[j], count_sign, m)
                if listing:
                    c, dst = ndefer[t], defer[t]
                    for g0 in range(0, m, 64):  # a 64-bit mask per 64 elements, then its set bits
                        gf = flag[g0:min(m, g0 + 64)]
                        any_ = np.int32(0)
                        for i in range(gf.shape[0]):  # most groups list nothing: an OR is cheaper than the mask
                            any_ |= gf[i]
                        if any_ == 0:
                            continue
                        mask = np.uint64(0)
                        for i in range(gf.shape[0]):
                            mask |= np.uint64(gf[i]) << np.uint64(i)
                        while mask:
                            if c < cap:  # past the buffer's end: counted only, the caller falls back
                                dst[c] = s0 + g0 + _cttz(mask)
                            c += 1
                            mask &= mask - np.uint64(1)
                    ndefer[t] = c
                _disjoint_mean(tr, m, gamma_, total_, count_)
                bw, upd, os = brow[:m], total_[:m], out[s0:s0 + m]
                for i in range(m):
                    _store(os, i, bw[i] + lam * upd[i])
            if bracket:
                for j in range(ne):
                    below[t, j] += nlo[j].astype(np.int64).sum()
                    below[t, ne + j] += nhi[j].astype(np.int64).sum()
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _ties_gather_kernel(b, e, ne, idx, dare, dare_thr, k1, k2, first, scale, taus, bvals, bad):
        """The elements idx[:] of a unit only: taus[j, i] = tau_j (DARE'd when asked) and bvals[i] = base of
        element idx[i], exactly as _task_rows computes them, for _kth_in_brackets and _ties_redo_kernel."""
        nd = idx.shape[0]
        for blk in prange((nd + SUB - 1) // SUB):
            chk = np.zeros(SUB, np.float32)
            s0 = blk * SUB
            m = min(SUB, nd - s0)
            ix, bw = idx[s0:s0 + m], bvals[s0:s0 + m]
            for i in range(m):
                bw[i] = _load(b, ix[i])
            for j in range(ne):
                row, ej = taus[j, s0:s0 + m], e[j]
                for i in range(m):
                    row[i] = _load(ej, ix[i]) - bw[i]
                if dare:  # the mask of element first + idx[i], as _task_rows computes it
                    kj1, kj2 = np.uint32(k1[j]), np.uint32(k2[j])
                    for i in range(m):
                        g = first + np.uint64(ix[i])
                        h = _mix32(np.uint32(g & np.uint64(0xFFFFFFFF)) ^ kj1)
                        h = _mix32(h ^ np.uint32(g >> np.uint64(32)) ^ kj2)
                        row[i] = row[i] * np.float32(h >= dare_thr) * scale
                for i in range(m):
                    chk[i] += row[i] * np.float32(0.0)
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _ties_redo_kernel(idx, taus, bvals, thr, lam, count_sign, out):
        """Merge the gathered elements with the exact thresholds thr, as _ties_kernel does, into out[idx[i]]."""
        nd = idx.shape[0]
        ne = taus.shape[0]
        for blk in prange((nd + SUB - 1) // SUB):
            tr = np.empty((ne, SUB), np.float32)
            gamma_ = np.empty(SUB, np.float32)
            total_ = np.empty(SUB, np.float32)
            count_ = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)  # unused: the taus were checked when gathered
            s0 = blk * SUB
            m = min(SUB, nd - s0)
            for j in range(ne):
                tr[j, :m] = taus[j, s0:s0 + m]
            _ties_rows(tr, m, thr, count_sign, gamma_, total_, count_, chk)
            ix, bw, upd = idx[s0:s0 + m], bvals[s0:s0 + m], total_[:m]
            for i in range(m):
                _store(out, ix[i], bw[i] + lam * upd[i])

    @njit(inline="always")
    def _mag_bits(x, st, end):
        """|x| as its (non-negative, so ordered) int32 bit pattern; whether it is below [st, end), whether inside."""
        bits = np.float32(abs(x)).view(np.int32)
        return bits, np.int32(bits < st), np.int32((bits >= st) & (bits < end))

    @njit(inline="always")
    def _hist4(bs, a0, a1, a2, a3, st4, end4, sh4, m, rows, hist, cnt):
        """_hist_kernel's counts for one sub-block of 4 expert slots and one window each, in one loop as _ties4
        (cnt[j] += values below window j, hist[j] its bins): the bit patterns and which windows hold them are
        written once per element (rows: int32 scratch [5, >= m]), then only the few inside are binned. 1 if
        anything was not finite."""
        s0_, s1_, s2_, s3_ = np.int32(st4[0]), np.int32(st4[1]), np.int32(st4[2]), np.int32(st4[3])
        n0, n1, n2, n3 = np.int32(end4[0]), np.int32(end4[1]), np.int32(end4[2]), np.int32(end4[3])
        code, r0, r1, r2, r3 = rows[0, :m], rows[1, :m], rows[2, :m], rows[3, :m], rows[4, :m]
        l0 = l1 = l2 = l3 = np.int32(0)
        nb = np.int32(0)
        for i in range(m):
            b = _load(bs, i)
            x0, x1, x2, x3 = _load(a0, i) - b, _load(a1, i) - b, _load(a2, i) - b, _load(a3, i) - b
            ck = x0 * np.float32(0.0) + x1 * np.float32(0.0) + x2 * np.float32(0.0) + x3 * np.float32(0.0)
            nb |= np.int32(ck != np.float32(0.0))
            r0[i], u0, w0 = _mag_bits(x0, s0_, n0)
            r1[i], u1, w1 = _mag_bits(x1, s1_, n1)
            r2[i], u2, w2 = _mag_bits(x2, s2_, n2)
            r3[i], u3, w3 = _mag_bits(x3, s3_, n3)
            l0 += u0
            l1 += u1
            l2 += u2
            l3 += u3
            code[i] = w0 | (w1 << 1) | (w2 << 2) | (w3 << 3)
        cnt[0] += l0
        cnt[1] += l1
        cnt[2] += l2
        cnt[3] += l3
        for g0 in range(0, m, 64):  # a 64-bit mask of the elements some window holds, then its set bits
            gc = code[g0:min(m, g0 + 64)]
            mask = np.uint64(0)
            for i in range(gc.shape[0]):
                mask |= np.uint64(gc[i] != 0) << np.uint64(i)
            while mask:
                i = g0 + _cttz(mask)
                c = code[i]
                if c & 1:
                    hist[0, (np.int64(r0[i]) - st4[0]) >> sh4[0]] += 1
                if c & 2:
                    hist[1, (np.int64(r1[i]) - st4[1]) >> sh4[1]] += 1
                if c & 4:
                    hist[2, (np.int64(r2[i]) - st4[2]) >> sh4[2]] += 1
                if c & 8:
                    hist[3, (np.int64(r3[i]) - st4[3]) >> sh4[3]] += 1
                mask &= mask - np.uint64(1)
        return nb

    @_jit
    def _hist_kernel(b, e, ne, dare, dare_thr, k1, k2, first, scale, starts, shifts, nbins, below, out, bad):
        """Selection counts of |tau_j| (or |DARE(tau_j)|) for every expert in one pass: for window q of expert j
        (bit patterns [starts, starts + nbins << shifts), starts -1: unused), below[t, j*nq+q] counts the values
        under it and out[t, j*nq+q, :nbins] its bins. Row t of both is private to work item t."""
        n = b.shape[0]
        nq = starts.shape[1]
        T = out.shape[0]
        per = (((n + T - 1) // T + SUB - 1) // SUB) * SUB
        # 3 or 4 experts, no DARE, one sampled window each (the usual pass): _hist4's one loop instead
        four = (ne == 3 or ne == 4) and not dare and nq == 1
        st4 = np.full(4, 0x7FFFFFFF, np.int64)  # start, end (exclusive) and shift of each slot's window; none: empty
        end4 = np.full(4, 0x7FFFFFFF, np.int64)
        sh4 = np.zeros(4, np.int64)
        for j in range(ne if four else 0):
            if starts[j, 0] >= 0:
                st4[j], sh4[j] = starts[j, 0], shifts[j, 0]
                end4[j] = min(starts[j, 0] + (nbins[j, 0] << shifts[j, 0]), 0x7FFFFFFF)
                four &= not (starts[j, 0] == 0 and end4[j] == 0x7FFFFFFF)  # the whole range (radix pass 1): the loop below
        for th in prange(T):
            if four:
                cnt = np.zeros(4, np.int64)
                rows = np.empty((5, SUB), np.int32)
                nb = np.int32(0)
                for s0 in range(th * per, min(n, (th + 1) * per), SUB):
                    m = min(SUB, n - s0)
                    nb |= _hist4(b[s0:s0 + m], e[0][s0:s0 + m], e[1][s0:s0 + m], e[2][s0:s0 + m],
                                 e[3 if ne == 4 else 0][s0:s0 + m], st4, end4, sh4, m, rows, out[th], cnt)
                for j in range(ne):
                    if starts[j, 0] >= 0:
                        below[th, j] += cnt[j]
                if nb:
                    bad[0] = 1
                continue
            tr = np.empty((ne, SUB), np.float32)
            brow = np.empty(SUB, np.float32)
            chk = np.zeros(SUB, np.float32)
            bits_ = np.empty(SUB, np.int32)  # non-negative float32 bits: int32 lanes, twice as many per vector
            flag_ = np.empty(SUB, np.int32)
            nbl = np.zeros((ne * nq, SUB), np.int32)  # lane-wise counts below each window (a scalar sum did not vectorize)
            for s0 in range(th * per, min(n, (th + 1) * per), SUB):
                m = min(SUB, n - s0)
                _task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
                bits, flag = bits_[:m], flag_[:m]
                for j in range(ne):
                    row = tr[j, :m]
                    for i in range(m):
                        bits[i] = np.float32(abs(row[i])).view(np.int32)
                    for q in range(nq):
                        st, sh = starts[j, q], shifts[j, q]
                        if st < 0:
                            continue
                        width = nbins[j, q] << sh
                        st32 = np.int32(st)
                        cb = nbl[j * nq + q, :m]
                        for i in range(m):
                            cb[i] += bits[i] < st32
                        hq = out[th, j * nq + q]
                        if st == 0 and width >= (1 << 31):  # the whole range (radix pass 1): every value counts
                            for i in range(m):
                                hq[bits[i] >> sh] += 1
                            continue
                        # A sampled window holds a few percent of the values: which are inside (vectorized), then
                        # per 64 elements a mask of them and its set bits (a branch per element costs ~2x this kernel).
                        end32 = np.int32(min(st + width, 0x7FFFFFFF))
                        for i in range(m):
                            flag[i] = (bits[i] >= st32) & (bits[i] < end32)
                        for g0 in range(0, m, 64):
                            gf = flag[g0:min(m, g0 + 64)]
                            any_ = np.int32(0)
                            for i in range(gf.shape[0]):
                                any_ |= gf[i]
                            if any_ == 0:
                                continue
                            mask = np.uint64(0)
                            for i in range(gf.shape[0]):
                                mask |= np.uint64(gf[i]) << np.uint64(i)
                            while mask:
                                i = g0 + _cttz(mask)
                                hq[(np.int64(bits[i]) - st) >> sh] += 1
                                mask &= mask - np.uint64(1)
            for r in range(ne * nq):
                below[th, r] += nbl[r].astype(np.int64).sum()
            if not _finite(chk):
                bad[0] = 1

    @_jit
    def _sum_items(out, total):
        """total[r, :] = sum over t of out[t, r, :] (int32 private counts into int64): numpy's axis-0 sum with a
        dtype change is ~10x slower."""
        T, R, B = out.shape
        for c in prange((B + BLOCK - 1) // BLOCK):
            lo, hi = c * BLOCK, min(B, (c + 1) * BLOCK)
            for r in range(R):
                tr = total[r, lo:hi]
                for i in range(hi - lo):
                    tr[i] = 0
                for t in range(T):
                    src = out[t, r, lo:hi]
                    for i in range(hi - lo):
                        tr[i] += src[i]

    @_jit
    def _sample_kernel(b, e, ne, dare, dare_thr, k1, k2, first, scale, step, run, out, bad):
        """out[j, s*run:(s+1)*run] = |tau_j| of the run of elements starting at s * step."""
        runs = out.shape[1] // run
        for s in prange(runs):
            tr = np.empty((ne, run), np.float32)
            brow = np.empty(run, np.float32)
            chk = np.zeros(run, np.float32)
            _task_rows(b, e, s * step, run, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
            for j in range(ne):
                o, row = out[j, s * run:(s + 1) * run], tr[j]
                for i in range(run):
                    o[i] = abs(row[i])
            if not _finite(chk):
                bad[0] = 1

    @_jit_serial
    def _select(a, k):
        """a[k] of a sorted, found by reordering `a` in place so that a[:k] <= a[k] <= a[k + 1:] (Hoare's
        quickselect, median-of-three pivots). Not np.partition: numba compiles that in ~20 s, this in ~1 s.
        Finite values only (the callers' are)."""
        lo, hi = 0, a.shape[0] - 1
        while lo < hi:
            mid = (lo + hi) >> 1
            if a[mid] < a[lo]:
                a[mid], a[lo] = a[lo], a[mid]
            if a[hi] < a[mid]:
                a[hi], a[mid] = a[mid], a[hi]
                if a[mid] < a[lo]:
                    a[mid], a[lo] = a[lo], a[mid]
            pivot, i, j = a[mid], lo, hi
            while i <= j:  # a[lo:i] <= pivot <= a[j + 1:hi + 1]
                while a[i] < pivot:
                    i += 1
                while pivot < a[j]:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if k <= j:
                hi = j
            elif k >= i:
                lo = i
            else:  # j < k < i: a[k] == pivot
                return a[k]
        return a[k]

    @_jit_serial
    def _kth_in_bracket(taus, lo, hi, k):
        """(how many |taus| lie in [lo, hi], the k-th smallest of those (1-based) or NaN if k is out of range).
        Counts bit patterns when the bracket spans few (no sort); else selects among the values inside."""
        n_in = 0
        for t in taus:
            x = abs(t)
            n_in += (x >= lo) & (x <= hi)
        if k < 1 or k > n_in:
            return n_in, np.float32(np.nan)
        lob = np.int64(np.float32(lo).view(np.int32))
        span = np.int64(np.float32(hi).view(np.int32)) - lob + 1  # non-negative floats order as their bits
        if span <= (1 << 20):
            cnt = np.zeros(span + 1, np.int32)
            for t in taus:  # branch-free: values outside the bracket land in the spare last counter
                o = np.int64(np.float32(abs(t)).view(np.int32)) - lob
                cnt[o if (o >= 0) & (o < span) else span] += 1
            acc = 0
            for i in range(span):
                acc += cnt[i]
                if acc >= k:
                    return n_in, np.int32(lob + i).view(np.float32)
        vals = np.empty(n_in, np.float32)
        c = 0
        for t in taus:
            x = abs(t)
            if x >= lo and x <= hi:
                vals[c] = x
                c += 1
        return n_in, _select(vals, k - 1)

    @_jit_serial
    def _bin_values(a, bits, t1, n1, t2, n2):
        """The values of a whose top 16 bits are t1 (n1 of them) and those whose top 16 bits are t2 (n2), in one
        pass; a bin of -1 collects nothing."""
        p1, p2 = np.empty(n1, np.float32), np.empty(n2, np.float32)
        c1, c2 = 0, 0
        for i in range(a.shape[0]):
            t = bits[i] >> 16
            if t == t1:
                p1[c1] = a[i]
                c1 += 1
            elif t == t2:
                p2[c2] = a[i]
                c2 += 1
        return p1, p2

    @_jit_serial
    def _order_stats_of(a, p1, p2):
        """(a sorted [p1], a sorted [p2]) for p1 < p2 of magnitudes a (finite, >= 0), without reordering a; a
        position of -1 is skipped (its value comes back as 0). Non-negative floats order as their bit patterns, so
        one pass counts the values per top 16 bits (bf16-derived magnitudes fill a few hundred of these 32768
        bins), the counts locate each position's bin, and the values of that bin alone are selected among.
        Replaced a subsample-bracketed quickselect: ~1.4 against ~1.8 ms per 2**18 values, and it cannot miss."""
        bits = a.view(np.int32)
        counts = np.zeros(1 << 15, np.int32)  # a sample has < 2**31 values
        for i in range(a.shape[0]):
            counts[bits[i] >> 16] += 1
        b1, b2, before1, before2, seen = -1, -1, 0, 0, 0
        for t in range(1 << 15):
            c = counts[t]
            if b1 < 0 and 0 <= p1 < seen + c:
                b1, before1 = t, seen
            if b2 < 0 and 0 <= p2 < seen + c:
                b2, before2 = t, seen
            seen += c
        v1, v2 = np.float32(0.0), np.float32(0.0)
        t2 = b2 if b2 != b1 else -1  # both positions in one bin: its values are collected once
        part1, part2 = _bin_values(a, bits, b1, counts[b1] if b1 >= 0 else 0, t2, counts[t2] if t2 >= 0 else 0)
        if b1 >= 0:
            k = p1 - before1
            v1 = _select(part1, k)  # and part1[k + 1:] holds the larger values of the bin
            if b2 == b1:
                v2 = _select(part1[k + 1:], p2 - p1 - 1)
        if t2 >= 0:
            v2 = _select(part2, p2 - before2)
        return v1, v2

    @_jit
    def _order_stats(sample, lo_pos, hi_pos, lo, hi):
        """lo[j], hi[j] = the values at positions lo_pos[j] < hi_pos[j] of sample[j] sorted (-1: leave as is),
        by counting and selecting (experts in parallel), not sorting."""
        for j in prange(sample.shape[0]):
            v1, v2 = _order_stats_of(sample[j], lo_pos[j], hi_pos[j])
            if lo_pos[j] >= 0:
                lo[j] = v1
            if hi_pos[j] >= 0:
                hi[j] = v2

    @_jit
    def _kth_in_brackets(taus, lo, hi, ks, n_in, thr):
        """_kth_in_bracket of every expert's row of taus, experts in parallel."""
        for j in prange(taus.shape[0]):
            n_in[j], thr[j] = _kth_in_bracket(taus[j], lo[j], hi[j], ks[j])

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

    @_jit_serial
    def _exponent_carries(words, mask, carry):
        """OR over 64-bit words of ((word & mask) + carry), `mask` the exponent bits of each lane (a bf16 or float32
        value) and `carry` their lowest bit: a lane's exponent is all ones (NaN or inf) iff that sum carries into the
        lane's sign bit, and never past it. Two operations per 8 bytes: memory speed."""
        acc = np.uint64(0)
        for i in range(words.shape[0]):
            acc |= (words[i] & mask) + carry
        return acc


# ------------------------------------------------------------------------------------------------------------
# Python side: raw views of tiles, dispatch, and the fallback contract (None = use methods.py)


def _raw_view(t: torch.Tensor) -> np.ndarray | None:
    """A flat numpy view of a CPU tile in a dtype the kernels read (bf16 as its uint16 bits), else None."""
    import torch

    if t.device.type != "cpu":
        return None
    if t.dtype == torch.bfloat16:
        return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.reshape(-1).numpy()
    return None


def _raw(tiles: list[torch.Tensor]) -> tuple | None:
    """Flat numpy views of CPU tiles sharing one stored dtype the kernels read, else None."""
    if len({t.dtype for t in tiles}) != 1:
        return None
    views = tuple(_raw_view(t) for t in tiles)
    return None if any(v is None for v in views) else views


def _out_view(out: torch.Tensor):
    return _raw_view(out)


def _dare_args(p: float, seed: int, name: str, n_experts: int, element_offset: int):
    """(dare?, threshold, k1s, k2s, first, 1/(1-p) as float32): the mask of masks.dare_keep_mask, element for element."""
    if p <= 0.0:
        z = np.zeros(n_experts, np.uint32)
        return False, np.uint32(0), z, z, np.uint64(0), np.float32(1.0)
    keys = [stream_keys(seed, i, name) for i in range(n_experts)]
    return (True, np.uint32(min(int(round(p * 2**32)), 2**32 - 1)), np.array([k[0] for k in keys], np.uint32),
            np.array([k[1] for k in keys], np.uint32), np.uint64(element_offset), np.float32(1.0 / (1.0 - p)))


def _dare_p(method: str, params) -> float:
    k = METHODS[method].kernel
    return float(k.dare(params)) if k is not None else 0.0


MERGE_KERNELS = tuple(n for n, m in METHODS.items() if m.kernel is not None and m.kernel.merge is not None)
MAGNITUDE_KERNELS = tuple(n for n, m in METHODS.items() if m.kernel is not None and m.kernel.magnitudes)
SELECT_MERGE_KERNELS = tuple(n for n, m in METHODS.items() if m.kernel is not None and m.kernel.merge == "ties")


def merge_tile(method: str, params, weights: list[float], ctx, base, experts, out: torch.Tensor) -> bool:
    """Merge a whole unit into `out` (its final dtype) with a fused kernel. False: not handled here (no numba,
    a method or dtype without a kernel, or values whose non-finite handling only methods.py defines)."""
    if numba is None or method not in MERGE_KERNELS or (method != "average" and base is None):
        return False
    models = _raw(([base] if base is not None else []) + list(experts))
    dst = _out_view(out)
    if models is None or dst is None:
        return False
    return merge_arrays(method, params, weights, ctx, models, base is not None, dst)


@_launches_kernels
def merge_arrays(method: str, params, weights: list[float], ctx, models: tuple, has_base: bool, dst: np.ndarray) -> bool:
    """merge_tile on flat numpy arrays of one stored dtype (RAW_CODES; base first when has_base) into `dst` (the
    output dtype's array); needs no torch. `ctx` gives the unit's name, seed, element_offset and, for TIES, its
    thresholds (a methods.TileContext, or anything with those attributes)."""
    if numba is None or method not in MERGE_KERNELS or (method != "average" and not has_base) or dst.shape[0] == 0:
        return False
    bad = np.zeros(1, np.uint8)
    b, e = (models[0], models[1:]) if has_base else (models[0][:0], models)
    if method == "average":
        w = np.array(weights, np.float64)
        _average_kernel(*_slots(e), b, w, bool(params.normalize), 1.0 / float(sum(weights)), dst, bad)
        return not bad[0]
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, len(e), ctx.element_offset)
    lam = np.float32(params.lambda_)
    if method in ("task_arithmetic", "dare_linear"):
        _linear_kernel(b, *_slots(e), np.array(weights, np.float32), lam, dare, dthr, k1, k2, first, scale, dst, bad)
    else:
        thr = np.array([t.get("min", 0.0) for t in ctx.thresholds] if ctx.thresholds else [0.0] * len(e), np.float32)
        none = np.empty(0, np.float32)
        T = _work_items(b.shape[0])
        _ties_kernel(b, *_slots(e), thr, lam, params.sign == "count", dare, dthr, k1, k2, first, scale, none, none,
                     np.zeros((T, len(e)), np.int64), np.empty((T, 0), np.int64), np.zeros(T, np.int64), dst, bad)
    return not bad[0]


# numba compiles a kernel once per argument type, and a tuple's length is part of its type: every expert count
# would pay its own compilation (~5-15 s per kernel, a minute for TIES with its selection, on every fresh node or
# install). Experts go in as a tuple of EXPERT_SLOTS arrays (the next power of two beyond that) plus their count;
# the kernels loop over the count, so the padding is never read.
EXPERT_SLOTS = 8


def _slots(e) -> tuple[tuple, int]:
    """(the experts' arrays padded to a fixed tuple length with repeats of the first, how many are real)."""
    size = max(EXPERT_SLOTS, 1 << (len(e) - 1).bit_length())
    return tuple(e) + (e[0],) * (size - len(e)), len(e)


def _work_items(n: int) -> int:
    """Contiguous work items per kernel call: a few per thread (load balance), none smaller than a BLOCK."""
    return max(1, min(4 * numba.get_num_threads(), n // BLOCK))


@_launches_kernels
def select_and_merge_ties(method: str, params, weights: list[float], ctx, base, experts, out: torch.Tensor,
                          ks: list[int]) -> list[float] | None:
    """ties / dare_ties of one in-memory unit whose per-expert thresholds (the ks[j]-th smallest magnitude) are not
    known yet, in one pass over the tiles instead of a selection pass and then a merge pass.

    A sample brackets each threshold (_sample_bracket); the bracketed merge writes every element whose trim
    does not depend on where in its bracket the threshold lies and lists the rest (a few percent); their
    magnitudes give the exact thresholds, and those elements are merged again with them. Same bytes as
    selecting first and merging after. Returns the thresholds, or None when not handled here or when a bracket
    missed (the caller then selects and merges separately; `out` may hold garbage)."""
    if numba is None or method not in SELECT_MERGE_KERNELS or base is None:
        return None
    models, dst = _raw([base] + list(experts)), _out_view(out)
    if models is None or dst is None:
        return None
    return _select_and_merge(method, params, ctx, models, dst, ks)


@_launches_kernels
def select_and_merge_arrays(method: str, params, ctx, models: tuple, dst: np.ndarray, ks: list[int]) -> list[float] | None:
    """select_and_merge_ties on flat numpy arrays of one stored dtype (RAW_CODES, base first) into `dst` (the
    output dtype's array); needs no torch (merge/kernel_path.py)."""
    if numba is None or method not in SELECT_MERGE_KERNELS:
        return None
    return _select_and_merge(method, params, ctx, models, dst, ks)


def _select_and_merge(method: str, params, ctx, models: tuple, dst: np.ndarray, ks: list[int]) -> list[float] | None:
    n_e = len(models) - 1
    dare_args = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, n_e, ctx.element_offset)
    bracket = _sample_bracket(models[0], models[1:], dare_args, ks)
    if bracket is None:
        return None
    part = _bracketed_arrays(method, params, ctx, models, dst, *bracket, index_offset=0)
    return None if part is None else _finish_bracketed(params, ctx.name, bracket[0], bracket[1], ks, [part], dst)


@_launches_kernels
def bracketed_ties_tile(method: str, params, ctx, base, experts, out: torch.Tensor, lo: np.ndarray,
                        hi: np.ndarray, share: float):
    """The bracketed pass of select_and_merge_ties over one tile of a tensor split into several units, whose
    brackets [lo[j], hi[j]] come from a sample of the whole tensor: `out` gets the merge with the provisional
    thresholds hi, and the elements to redo are returned as (indices in the tensor, their taus [expert, i], their
    base values, per-expert counts of magnitudes below lo) for `finish_bracketed_ties`. None: not handled here
    (no kernel for these dtypes, a non-finite input, or more elements in the brackets than the sample said)."""
    if numba is None or method not in SELECT_MERGE_KERNELS or base is None:
        return None
    return _bracketed_pass(method, params, ctx, base, experts, out, lo, hi, share, index_offset=ctx.element_offset)


@_launches_kernels
def finish_bracketed_ties(params, name: str, lo, hi, ks: list[int], parts: list, out: torch.Tensor) -> list[float] | None:
    """Exact thresholds from the parts of every tile of a tensor (bracketed_ties_tile) and the redo of the listed
    elements in `out`, the whole tensor's merged rows. None: a bracket missed (`out` is then not the merge)."""
    return _finish_bracketed(params, name, lo, hi, ks, parts, _out_view(out))


def _bracketed_pass(method: str, params, ctx, base, experts, out, lo, hi, share, index_offset: int):
    models, dst = _raw([base] + list(experts)), _out_view(out)
    if models is None or dst is None:
        return None
    return _bracketed_arrays(method, params, ctx, models, dst, lo, hi, share, index_offset)


def _bracketed_arrays(method: str, params, ctx, models: tuple, dst: np.ndarray, lo, hi, share, index_offset: int):
    """(indices of the listed elements + index_offset, their taus, base values, counts below lo) or None."""
    b, e = models[0], models[1:]
    n, n_e = b.shape[0], len(e)
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, n_e, ctx.element_offset)
    T = _work_items(n)
    cap = int(REDO_SLACK * n / T * min(1.0, share)) + 4 * SUB
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if (lo == hi).all():
        cap = 0
    below, ndefer = np.zeros((T, 2 * n_e), np.int64), np.zeros(T, np.int64)
    defer = np.empty((T, cap), np.int64)
    lam, count_sign, bad = np.float32(params.lambda_), params.sign == "count", np.zeros(1, np.uint8)
    none = np.empty(0, np.float32)
    _ties_kernel(b, *_slots(e), none, lam, count_sign, dare, dthr, k1, k2, first, scale, lo, hi, below, defer, ndefer, dst, bad)
    if bad[0] or (ndefer > cap).any():
        return None
    idx = np.concatenate([defer[t, :ndefer[t]] for t in range(T)])
    taus, bvals = np.empty((n_e, idx.shape[0]), np.float32), np.empty(idx.shape[0], np.float32)
    _ties_gather_kernel(b, *_slots(e), idx, dare, dthr, k1, k2, first, scale, taus, bvals, bad)
    if bad[0]:
        return None
    return idx + int(index_offset), taus, bvals, below.sum(0)


def _finish_bracketed(params, name: str, lo, hi, ks: list[int], parts: list, dst: np.ndarray) -> list[float] | None:
    idx = np.concatenate([p[0] for p in parts])
    taus = np.concatenate([p[1] for p in parts], axis=1)
    bvals = np.concatenate([p[2] for p in parts])
    n_e = taus.shape[0]
    counts = np.sum([p[3] for p in parts], axis=0)
    below_j, at_most_hi = counts[:n_e], counts[n_e:]
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    # every magnitude inside a bracket is in taus[j] (its element was listed), so this is its exact rank there
    inside, thr = np.empty(n_e, np.int64), np.empty(n_e, np.float32)
    _kth_in_brackets(taus, lo, hi, np.asarray(ks, np.int64) - below_j, inside, thr)
    one = lo == hi  # brackets of one value: counted, not listed (_ties_kernel)
    inside[one], thr[one] = at_most_hi[one] - below_j[one], lo[one]
    for j, k in enumerate(ks):
        if not below_j[j] < k <= below_j[j] + inside[j]:
            log.debug("bracket missed for %s expert %d (k=%d, below %d, inside %d)", name, j, k, below_j[j], inside[j])
            return None
    _ties_redo_kernel(idx, taus, bvals, thr, np.float32(params.lambda_), params.sign == "count", dst)
    return [float(v) for v in thr]


@_launches_kernels
def histograms(method: str, params, ctx, base, experts, windows: list[list]) -> list[list[tuple[int, torch.Tensor]]] | None:
    """Per-expert selection counts of the method's magnitudes over a unit, as selection.window_histogram would
    give them: windows[j] lists expert j's selection.Window's (at most 2); returns [j][q] = (values below,
    int64 bins). None: not handled here."""
    if numba is None or method not in MAGNITUDE_KERNELS or base is None:
        return None
    models = _raw([base] + list(experts))
    got = _histograms(method, params, ctx, models, windows) if models is not None else None
    if got is None:
        return None
    import torch

    return [[(below, torch.from_numpy(hist)) for below, hist in per] for per in got]


@_launches_kernels
def histogram_arrays(method: str, params, ctx, models: tuple, windows: list[list]) -> list[list[tuple[int, np.ndarray]]] | None:
    """histograms on flat numpy arrays of one stored dtype (RAW_CODES, base first), counts as int64 numpy arrays;
    needs no torch (merge/kernel_path.py)."""
    if numba is None or method not in MAGNITUDE_KERNELS:
        return None
    return _histograms(method, params, ctx, models, windows)


def _histograms(method: str, params, ctx, models: tuple, windows: list[list]):
    if any(len(ws) > 2 for ws in windows):
        return None
    b, e = models[0], models[1:]
    n_e = len(e)
    dare, dthr, k1, k2, first, scale = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, n_e, ctx.element_offset)
    # Private counts per work item, at most HIST_ITEMS of them: on a many-core node one per thread would be
    # T x N x 65536 counters zeroed and summed for every unit (hundreds of MB at 64 threads).
    items = min(numba.get_num_threads(), HIST_ITEMS)
    nq = max([len(ws) for ws in windows] + [1])
    starts, shifts, nbins = (np.full((n_e, nq), -1, np.int64), np.zeros((n_e, nq), np.int64), np.zeros((n_e, nq), np.int64))
    for j, ws in enumerate(windows):
        for q, w in enumerate(ws):
            starts[j, q], shifts[j, q], nbins[j, q] = w.start, w.shift, w.bins
    below = np.zeros((items, n_e * nq), np.int64)
    out = np.zeros((items, n_e * nq, int(nbins.max()) or 1), np.int32)  # a unit has < 2**31 elements
    bad = np.zeros(1, np.uint8)
    _hist_kernel(b, *_slots(e), dare, dthr, k1, k2, first, scale, starts, shifts, nbins, below, out, bad)
    if bad[0]:
        return None
    below, total = below.sum(0), np.empty(out.shape[1:], np.int64)
    _sum_items(out, total)
    return [[(int(below[j * nq + q]), total[j * nq + q, :w.bins]) for q, w in enumerate(ws)]
            for j, ws in enumerate(windows)]


@_launches_kernels
def magnitude_arrays(method: str, params, ctx, models: tuple) -> np.ndarray | None:
    """[expert, element] float32 magnitudes of a few rows (flat numpy arrays of one stored dtype, base first), as
    the method's `magnitudes` gives them; None for a non-finite input or a method without a kernel. For the
    sample that places the selection windows (statistics.sample_windows), without torch."""
    if numba is None or method not in MAGNITUDE_KERNELS:
        return None
    b, e = models[0], models[1:]
    out, bad = np.empty((len(e), b.shape[0]), np.float32), np.zeros(1, np.uint8)
    if b.shape[0]:
        dare_args = _dare_args(_dare_p(method, params), ctx.seed, ctx.name, len(e), ctx.element_offset)
        _sample_kernel(b, *_slots(e), *dare_args, 0, b.shape[0], out, bad)
    return None if bad[0] else out


def count_nonfinite(t: torch.Tensor) -> int | None:
    """Number of NaN/inf values in a CPU bf16/float32 tensor (exponent bits all ones); None: not handled here."""
    if numba is None or not t.is_contiguous():
        return None
    flat = _raw_view(t)
    if flat is None:
        return None
    return count_nonfinite_raw(flat)


# (exponent bits, their lowest bit, sign bits) of each lane of a 64-bit word, by the lanes' bit dtype
_LANES = {np.dtype(np.uint16): (0x7F807F807F807F80, 0x0080008000800080, 0x8000800080008000),
          np.dtype(np.uint32): (0x7F8000007F800000, 0x0080000000800000, 0x8000000080000000)}


def count_nonfinite_raw(flat: np.ndarray) -> int:
    """Number of NaN/inf values in a flat contiguous array of bf16 bits (uint16) or float32 (a kernel's output
    tile, or a `_raw_view`): every 64-bit word is checked at memory speed first (`_exponent_carries`; ~3x faster
    than counting bf16 values one by one), and values are counted only where that finds some."""
    bits = flat.view(np.uint32) if flat.dtype == np.float32 else flat
    count = _count_nonfinite_bf16 if bits.dtype == np.uint16 else _count_nonfinite_f32
    if numba is None:
        mask = 0x7F80 if bits.dtype == np.uint16 else 0x7F800000
        return int(np.count_nonzero((bits & mask) == mask))
    body = len(bits) - len(bits) % (8 // bits.itemsize)
    if body and bits.ctypes.data % 8 == 0:
        mask, carry, sign = _LANES[bits.dtype]
        if not _exponent_carries(bits[:body].view(np.uint64), np.uint64(mask), np.uint64(carry)) & sign:
            return int(count(bits[body:])) if body < len(bits) else 0
    return int(count(bits))


SAMPLE_RUNS = 256  # at least this many runs of SAMPLE_RUN elements sampled per expert (else no sampled bracket)
SAMPLE_MAX = 2**18  # at most this many magnitudes per expert: the bracket narrows as 1/sqrt(sample size), its cost grows
# (2**18, not 2**17: bf16 task vectors take few magnitudes, and brackets this narrow mostly hold one, which the
# merge counts instead of listing elements to redo; benchmarks/select_merge_units.py, docs/BENCHMARKS.md)
REDO_SLACK = 3.0  # room for this many times the sample's estimate of the elements a bracketed merge must redo


def _sample_bracket(b, e, dare_args, ks: list[int]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(lo, hi, share): selection.sample_bracket of each ks[j]-th smallest magnitude of expert j, from an evenly
    spaced sample (runs of SAMPLE_RUN consecutive elements, 1/8 of the unit at most), and the sample's share of
    elements with some magnitude in its bracket. None: unit too small for sampling to pay, or non-finite values."""
    n, n_e = b.shape[0], len(e)
    runs = min(SAMPLE_MAX // SAMPLE_RUN, n // (8 * SAMPLE_RUN))
    if runs < SAMPLE_RUNS:
        return None
    size = runs * SAMPLE_RUN
    bad = np.zeros(1, np.uint8)
    sample = np.empty((n_e, size), np.float32)
    _sample_kernel(b, *_slots(e), *dare_args, (n - SAMPLE_RUN) // (runs - 1), SAMPLE_RUN, sample, bad)
    if bad[0]:
        return None
    lo, hi = np.zeros(n_e, np.float32), np.full(n_e, np.inf, np.float32)
    from mergescale.merge.selection import bracket_positions

    # the two order statistics sample_bracket would read off each sorted sample, without sorting it
    ends = [bracket_positions(size, k, n) for k in ks]
    _order_stats(sample, np.array([-1 if a is None else a for a, _ in ends], np.int64),
                 np.array([-1 if b is None else b for _, b in ends], np.int64), lo, hi)
    # e.g. bf16 experts often have tau exactly 0 for a third of the elements: a bracket at 0 holds all of them
    inside = np.zeros(size, bool)
    for j in range(n_e):
        if lo[j] != hi[j]:  # a bracket of one value lists nothing (_ties_kernel)
            inside |= (sample[j] >= lo[j]) & (sample[j] <= hi[j])
    return lo, hi, float(inside.mean())


def warm_up(n_experts: int, dtype: str = "BF16", out_dtype: str | None = None, methods: list[str] | None = None,
            selection: bool = True) -> None:
    """Compile every kernel (or those of `methods`) for tiles of this stored dtype (a RAW_CODES code) and expert
    count, or load them from numba's on-disk cache, so that a timed merge does not pay for compilation; a fresh
    install's first merge otherwise does it on the way. selection=False: only the merge kernels, not TIES's
    selection kernels (a merge without a threshold to find never runs them). Needs no torch."""
    if numba is None:
        return
    from types import SimpleNamespace


    n = 8 * SAMPLE_RUNS * SAMPLE_RUN + 1  # large enough for the sampled bracket
    rng = np.random.default_rng(0)
    base32 = rng.standard_normal(n, dtype=np.float32)
    models32 = [base32] + [base32 + np.float32(0.01) * rng.standard_normal(n, dtype=np.float32) for _ in range(n_experts)]

    def stored(a: np.ndarray, code: str) -> np.ndarray:  # bf16 by truncation: any finite values will do here
        return (a.view(np.uint32) >> 16).astype(np.uint16) if code == "BF16" else a.astype(RAW_CODES[code])

    models = tuple(stored(m, dtype) for m in models32)
    dst = np.empty(n, RAW_CODES[out_dtype or dtype])
    ctx = SimpleNamespace(name="warm_up", seed=0, element_offset=0, thresholds=[{"min": 0.01}] * n_experts)
    for name in MERGE_KERNELS:
        if methods is None or name in methods:
            merge_arrays(name, METHODS[name].params(), [1.0] * n_experts, ctx, models, True, dst)
    dst[:5] = np.array(np.inf, np.float32).view(np.uint32) >> 16 if dst.dtype == np.uint16 else np.inf
    count_nonfinite_raw(dst)  # the merged-tile scan (reader.check_merged), both of its steps
    if not selection:
        return
    from mergescale.merge.selection import RADIX, window_around

    for name in SELECT_MERGE_KERNELS:
        if methods is None or name in methods:
            params = METHODS[name].params.model_validate({"density": 0.5})
            histogram_arrays(name, params, ctx, models, [[RADIX] for _ in models[1:]])
            histogram_arrays(name, params, ctx, models, [[RADIX.refine(7), window_around(0.5, 0.6)] for _ in models[1:]])
            select_and_merge_arrays(name, params, ctx, models, dst, [n // 2] * n_experts)
