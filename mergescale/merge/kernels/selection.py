"""The fused kernels of the statistics: counting each expert's magnitudes (|tau|, or |DARE(tau)|) into the windows
of the exact streaming selection (mergescale.merge.selection: which windows, how many passes), sampling them to
bracket a threshold, and selecting order statistics among a few values without sorting.

The magnitudes are the torch definition's bits (the method's `magnitudes`), computed as the merge kernels compute
task vectors (kernels.primitives.task_rows), so counts from here and from torch add up in one selector.
"""

from __future__ import annotations

import logging

import numba
import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from mergescale.merge.kernels.primitives import (
    BLOCK,
    SUB,
    dare_args,
    finite,
    group_mask,
    jit_parallel,
    jit_serial,
    load,
    slots,
    task_rows,
)

log = logging.getLogger(__name__)

HIST_ITEMS = 8  # most private histogram copies per call (see `histograms`)
SAMPLE_RUN = 256  # consecutive elements per sample run (bracket selection)
SAMPLE_RUNS = 256  # at least this many runs of SAMPLE_RUN elements sampled per expert (else no sampled bracket)
# At most this many magnitudes per expert: the bracket narrows as 1/sqrt(sample size), its cost grows. 2**18, not
# 2**17: bf16 task vectors take few magnitudes, and brackets this narrow mostly hold one, which the merge counts
# instead of listing elements to redo (benchmarks/select_merge_units.py)
SAMPLE_MAX = 2**18


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
        b = load(bs, i)
        x0, x1, x2, x3 = load(a0, i) - b, load(a1, i) - b, load(a2, i) - b, load(a3, i) - b
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
    for g0 in range(0, m, 64):  # the elements some window holds
        mask = group_mask(code, g0, m, False)
        while mask:
            i = g0 + trailing_zeros(mask)
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

@jit_parallel
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
            task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
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
                    # per 64 elements a mask of them and its set bits.
                    end32 = np.int32(min(st + width, 0x7FFFFFFF))
                    for i in range(m):
                        flag[i] = (bits[i] >= st32) & (bits[i] < end32)
                    for g0 in range(0, m, 64):
                        mask = group_mask(flag, g0, m, True)
                        while mask:
                            i = g0 + trailing_zeros(mask)
                            hq[(np.int64(bits[i]) - st) >> sh] += 1
                            mask &= mask - np.uint64(1)
        for r in range(ne * nq):
            below[th, r] += nbl[r].astype(np.int64).sum()
        if not finite(chk):
            bad[0] = 1

@jit_parallel
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

@jit_parallel
def _sample_kernel(b, e, ne, dare, dare_thr, k1, k2, first, scale, step, run, out, bad):
    """out[j, s*run:(s+1)*run] = |tau_j| of the run of elements starting at s * step."""
    runs = out.shape[1] // run
    for s in prange(runs):
        tr = np.empty((ne, run), np.float32)
        brow = np.empty(run, np.float32)
        chk = np.zeros(run, np.float32)
        task_rows(b, e, s * step, run, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
        for j in range(ne):
            o, row = out[j, s * run:(s + 1) * run], tr[j]
            for i in range(run):
                o[i] = abs(row[i])
        if not finite(chk):
            bad[0] = 1

@jit_serial
def select_kth(a, k):
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

@jit_serial
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
    return n_in, select_kth(vals, k - 1)

@jit_serial
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

@jit_serial
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
        v1 = select_kth(part1, k)  # and part1[k + 1:] holds the larger values of the bin
        if b2 == b1:
            v2 = select_kth(part1[k + 1:], p2 - p1 - 1)
    if t2 >= 0:
        v2 = select_kth(part2, p2 - before2)
    return v1, v2

@jit_parallel
def order_stats(sample, lo_pos, hi_pos, lo, hi):
    """lo[j], hi[j] = the values at positions lo_pos[j] < hi_pos[j] of sample[j] sorted (-1: leave as is),
    by counting and selecting (experts in parallel), not sorting."""
    for j in prange(sample.shape[0]):
        v1, v2 = _order_stats_of(sample[j], lo_pos[j], hi_pos[j])
        if lo_pos[j] >= 0:
            lo[j] = v1
        if hi_pos[j] >= 0:
            hi[j] = v2

@jit_parallel
def kth_in_brackets(taus, lo, hi, ks, n_in, thr):
    """_kth_in_bracket of every expert's row of taus, experts in parallel."""
    for j in prange(taus.shape[0]):
        n_in[j], thr[j] = _kth_in_bracket(taus[j], lo[j], hi[j], ks[j])


def histograms(dare_p: float, ctx, models: tuple, windows: list[list]) -> list[list[tuple[int, np.ndarray]]] | None:
    """Per-expert selection counts of the magnitudes of a unit (flat arrays of one stored dtype, base first), as
    selection.window_histogram would give them: windows[j] lists expert j's selection.Window's (at most 2);
    returns [j][q] = (values below, int64 bins). None: a non-finite value, or more than 2 windows."""
    if any(len(ws) > 2 for ws in windows):
        return None
    b, e = models[0], models[1:]
    n_e = len(e)
    dare, dthr, k1, k2, first, scale = dare_args(dare_p, ctx.seed, ctx.name, n_e, ctx.element_offset)
    # Private counts per work item, at most HIST_ITEMS of them: on a many-core node one per thread would be
    # T x N x 65536 counters zeroed and summed for every unit (hundreds of MB at 64 threads).
    items = min(numba.get_num_threads(), HIST_ITEMS)
    nq = max([len(ws) for ws in windows] + [1])
    starts = np.full((n_e, nq), -1, np.int64)
    shifts, nbins = np.zeros((n_e, nq), np.int64), np.zeros((n_e, nq), np.int64)
    for j, ws in enumerate(windows):
        for q, w in enumerate(ws):
            starts[j, q], shifts[j, q], nbins[j, q] = w.start, w.shift, w.bins
    below = np.zeros((items, n_e * nq), np.int64)
    out = np.zeros((items, n_e * nq, int(nbins.max()) or 1), np.int32)  # a unit has < 2**31 elements
    bad = np.zeros(1, np.uint8)
    _hist_kernel(b, *slots(e), dare, dthr, k1, k2, first, scale, starts, shifts, nbins, below, out, bad)
    if bad[0]:
        return None
    below, total = below.sum(0), np.empty(out.shape[1:], np.int64)
    _sum_items(out, total)
    return [[(int(below[j * nq + q]), total[j * nq + q, :w.bins]) for q, w in enumerate(ws)]
            for j, ws in enumerate(windows)]


def magnitudes(dare_p: float, ctx, models: tuple) -> np.ndarray | None:
    """[expert, element] float32 magnitudes of a unit (flat arrays of one stored dtype, base first), as the method's
    `magnitudes` gives them; None for a non-finite input."""
    b, e = models[0], models[1:]
    out, bad = np.empty((len(e), b.shape[0]), np.float32), np.zeros(1, np.uint8)
    if b.shape[0]:
        _sample_kernel(b, *slots(e), *dare_args(dare_p, ctx.seed, ctx.name, len(e), ctx.element_offset), 0,
                       b.shape[0], out, bad)
    return None if bad[0] else out


def sample_bracket(b, e, dare, ks: list[int]) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(lo, hi, share): selection.sample_bracket of each ks[j]-th smallest magnitude of expert j, from an evenly
    spaced sample (runs of SAMPLE_RUN consecutive elements, 1/8 of the unit at most), and the sample's share of
    elements with some magnitude in its bracket. `dare`: primitives.dare_args of the unit. None: unit too small
    for sampling to pay, or non-finite values."""
    from mergescale.merge.selection import bracket_positions

    n, n_e = b.shape[0], len(e)
    runs = min(SAMPLE_MAX // SAMPLE_RUN, n // (8 * SAMPLE_RUN))
    if runs < SAMPLE_RUNS:
        return None
    size = runs * SAMPLE_RUN
    bad = np.zeros(1, np.uint8)
    sample = np.empty((n_e, size), np.float32)
    _sample_kernel(b, *slots(e), *dare, (n - SAMPLE_RUN) // (runs - 1), SAMPLE_RUN, sample, bad)
    if bad[0]:
        return None
    lo, hi = np.zeros(n_e, np.float32), np.full(n_e, np.inf, np.float32)
    # the two order statistics sample_bracket would read off each sorted sample, without sorting it
    ends = [bracket_positions(size, k, n) for k in ks]
    order_stats(sample, np.array([-1 if a is None else a for a, _ in ends], np.int64),
                np.array([-1 if b is None else b for _, b in ends], np.int64), lo, hi)
    # e.g. bf16 experts often have tau exactly 0 for a third of the elements: a bracket at 0 holds all of them
    inside = np.zeros(size, bool)
    for j in range(n_e):
        if lo[j] != hi[j]:  # a bracket of one value lists nothing (ties._ties_kernel)
            inside |= (sample[j] >= lo[j]) & (sample[j] <= hi[j])
    return lo, hi, float(inside.mean())
