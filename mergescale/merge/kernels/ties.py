"""TIES as fused kernels: trim, elect and disjoint mean for a whole unit in one pass over its raw tiles
(`_ties_kernel`, which kernels.merging.merge runs when the thresholds are known).

TIES also merges a unit whose thresholds are not known yet: bracketed by a sample, every element whose trim
does not depend on where in its bracket a threshold lies is merged, the rest listed and redone once the listed
magnitudes give the exact thresholds (`select_and_merge`; `bracketed_tile` + `finish_bracketed` for a tensor
split into several units).
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from mergescale.merge.kernels import selection
from mergescale.merge.kernels.primitives import (
    SUB,
    base_row,
    dare_args,
    finite,
    group_mask,
    jit_parallel,
    load,
    mix32,
    sign,
    slots,
    store,
    tau_row,
    work_items,
)

log = logging.getLogger(__name__)

REDO_SLACK = 3.0  # room for this many times the sample's estimate of the elements a bracketed merge must redo

# TIES on a sub-block, in two passes over each expert's tau row rather than four: the first trims, checks
# and elects as it goes (_trim_elect), the second takes the disjoint mean (_disjoint_mean). ~25% faster than
# one pass per step; the float operations and their order are torch_math._ties_update_fast's. The trim is a select
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
        gamma[i] += sign(x) if count_sign else x

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
        gamma[i] += sign(x) if count_sign else x

@njit(inline="always")
def _disjoint_mean(tr, m, gamma_, total_, count_):
    """gamma = sign(sum of votes); total = mean of the trimmed taus that agree with gamma, times gamma (the TIES
    update), in total_[:m]."""
    gamma, total, count = gamma_[:m], total_[:m], count_[:m]
    for i in range(m):
        gamma[i] = sign(gamma[i])
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
    """torch_math._ties_update_fast on the tau rows tr[:, :m] (trimmed in place): the update lands in total_[:m]."""
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
    g += sign(x) if count_sign else x
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
    store(os, i, v)
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
            b = load(bs, i)
            x0, x1, x2, x3 = load(a0, i) - b, load(a1, i) - b, load(a2, i) - b, load(a3, i) - b
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
            b = load(bs, i)
            g, P, cp, N, cn, ck = _vote(load(a0, i) - b, t0, count_sign, z, z, z, z, z, z)
            g, P, cp, N, cn, ck = _vote(load(a1, i) - b, t1, count_sign, g, P, cp, N, cn, ck)
            g, P, cp, N, cn, ck = _vote(load(a2, i) - b, t2, count_sign, g, P, cp, N, cn, ck)
            g, P, cp, N, cn, ck = _vote(load(a3, i) - b, t3, count_sign, g, P, cp, N, cn, ck)
            nb |= _vote_store(os, i, b, lam, g, P, cp, N, cn, ck)
    return nb

@jit_parallel
def _ties_kernel(b, e, ne, thr, lam, count_sign, dare, dare_thr, k1, k2, first, scale, lo, hi, below, defer, ndefer,
                 out, bad):
    """ties / dare_ties: b + lam * torch_math._ties_update_fast(trim(tau_j, thr_j)), tau DARE'd when asked.

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
            bw, ck, gamma, flag = base_row(b, s0, m, brow), chk[:m], gamma_[:m], flag_[:m]
            for i in range(m):
                gamma[i] = 0.0
            if listing:
                for i in range(m):
                    flag[i] = 0
            for j in range(ne):
                row = tr[j, :m]
                tau_row(e[j][s0:s0 + m], bw, row, m, dare, dare_thr, np.uint32(k1[j]), np.uint32(k2[j]),
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
                for g0 in range(0, m, 64):
                    mask = group_mask(flag, g0, m, True)
                    while mask:
                        if c < cap:  # past the buffer's end: counted only, the caller falls back
                            dst[c] = s0 + g0 + trailing_zeros(mask)
                        c += 1
                        mask &= mask - np.uint64(1)
                ndefer[t] = c
            _disjoint_mean(tr, m, gamma_, total_, count_)
            bw, upd, os = brow[:m], total_[:m], out[s0:s0 + m]
            for i in range(m):
                store(os, i, bw[i] + lam * upd[i])
        if bracket:
            for j in range(ne):
                below[t, j] += nlo[j].astype(np.int64).sum()
                below[t, ne + j] += nhi[j].astype(np.int64).sum()
        if not finite(chk):
            bad[0] = 1

@jit_parallel
def _ties_gather_kernel(b, e, ne, idx, dare, dare_thr, k1, k2, first, scale, taus, bvals, bad):
    """The elements idx[:] of a unit only: taus[j, i] = tau_j (DARE'd when asked) and bvals[i] = base of
    element idx[i], exactly as task_rows computes them, for _kth_in_brackets and _ties_redo_kernel."""
    nd = idx.shape[0]
    for blk in prange((nd + SUB - 1) // SUB):
        chk = np.zeros(SUB, np.float32)
        s0 = blk * SUB
        m = min(SUB, nd - s0)
        ix, bw = idx[s0:s0 + m], bvals[s0:s0 + m]
        for i in range(m):
            bw[i] = load(b, ix[i])
        for j in range(ne):
            row, ej = taus[j, s0:s0 + m], e[j]
            for i in range(m):
                row[i] = load(ej, ix[i]) - bw[i]
            if dare:  # the mask of element first + idx[i], as task_rows computes it
                kj1, kj2 = np.uint32(k1[j]), np.uint32(k2[j])
                for i in range(m):
                    g = first + np.uint64(ix[i])
                    h = mix32(np.uint32(g & np.uint64(0xFFFFFFFF)) ^ kj1)
                    h = mix32(h ^ np.uint32(g >> np.uint64(32)) ^ kj2)
                    row[i] = row[i] * np.float32(h >= dare_thr) * scale
            for i in range(m):
                chk[i] += row[i] * np.float32(0.0)
        if not finite(chk):
            bad[0] = 1

@jit_parallel
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
            store(out, ix[i], bw[i] + lam * upd[i])


def select_and_merge(dare_p: float, params, ctx, models: tuple, dst: np.ndarray, ks: list[int]) -> list[float] | None:
    """TIES of one unit (base first) whose per-expert thresholds (the ks[j]-th smallest magnitude) are not known
    yet, in one pass over the tiles instead of a selection pass and then a merge pass.

    A sample brackets each threshold (selection.sample_bracket); the bracketed merge writes every element whose
    trim does not depend on where in its bracket the threshold lies and lists the rest (a few percent); their
    magnitudes give the exact thresholds, and those elements are merged again with them. Same bytes as
    selecting first and merging after. Returns the thresholds, or None when a bracket missed or the unit is too
    small to sample (the caller then selects and merges separately; `dst` may hold garbage)."""
    n_e = len(models) - 1
    dare = dare_args(dare_p, ctx.seed, ctx.name, n_e, ctx.element_offset)
    bracket = selection.sample_bracket(models[0], models[1:], dare, ks)
    if bracket is None:
        return None
    part = bracketed_tile(dare_p, params, ctx, models, dst, *bracket, index_offset=0)
    return None if part is None else finish_bracketed(params, ctx.name, bracket[0], bracket[1], ks, [part], dst)


def bracketed_tile(dare_p: float, params, ctx, models: tuple, dst: np.ndarray, lo, hi, share, index_offset: int):
    """The bracketed pass of `select_and_merge` over one unit, whose brackets [lo[j], hi[j]] may come from a sample
    of a whole tensor split into several units: `dst` gets the merge with the provisional thresholds hi, and the
    elements to redo are returned as (their indices + index_offset, their taus [expert, i], their base values,
    per-expert counts of magnitudes below lo and at most hi) for `finish_bracketed`. None: a non-finite input,
    or more elements in the brackets than the sample said."""
    b, e = models[0], models[1:]
    n, n_e = b.shape[0], len(e)
    dare, dthr, k1, k2, first, scale = dare_args(dare_p, ctx.seed, ctx.name, n_e, ctx.element_offset)
    T = work_items(n)
    cap = int(REDO_SLACK * n / T * min(1.0, share)) + 4 * SUB
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    if (lo == hi).all():
        cap = 0
    below, ndefer = np.zeros((T, 2 * n_e), np.int64), np.zeros(T, np.int64)
    defer = np.empty((T, cap), np.int64)
    lam, count_sign, bad = np.float32(params.lambda_), params.sign == "count", np.zeros(1, np.uint8)
    none = np.empty(0, np.float32)
    _ties_kernel(b, *slots(e), none, lam, count_sign, dare, dthr, k1, k2, first, scale, lo, hi, below, defer, ndefer,
                 dst, bad)
    if bad[0] or (ndefer > cap).any():
        return None
    idx = np.concatenate([defer[t, :ndefer[t]] for t in range(T)])
    taus, bvals = np.empty((n_e, idx.shape[0]), np.float32), np.empty(idx.shape[0], np.float32)
    _ties_gather_kernel(b, *slots(e), idx, dare, dthr, k1, k2, first, scale, taus, bvals, bad)
    if bad[0]:
        return None
    return idx + int(index_offset), taus, bvals, below.sum(0)


def finish_bracketed(params, name: str, lo, hi, ks: list[int], parts: list, dst: np.ndarray) -> list[float] | None:
    """The exact thresholds from the parts of every unit of a tensor (`bracketed_tile`), and the redo of the listed
    elements in `dst`, the whole tensor's merged rows. None: a bracket missed (`dst` is then not the merge)."""
    idx = np.concatenate([p[0] for p in parts])
    taus = np.concatenate([p[1] for p in parts], axis=1)
    bvals = np.concatenate([p[2] for p in parts])
    n_e = taus.shape[0]
    counts = np.sum([p[3] for p in parts], axis=0)
    below_j, at_most_hi = counts[:n_e], counts[n_e:]
    lo, hi = np.asarray(lo, np.float32), np.asarray(hi, np.float32)
    # every magnitude inside a bracket is in taus[j] (its element was listed), so this is its exact rank there
    inside, thr = np.empty(n_e, np.int64), np.empty(n_e, np.float32)
    selection.kth_in_brackets(taus, lo, hi, np.asarray(ks, np.int64) - below_j, inside, thr)
    one = lo == hi  # brackets of one value: counted, not listed (_ties_kernel)
    inside[one], thr[one] = at_most_hi[one] - below_j[one], lo[one]
    for j, k in enumerate(ks):
        if not below_j[j] < k <= below_j[j] + inside[j]:
            log.debug("bracket missed for %s expert %d (k=%d, below %d, inside %d)", name, j, k, below_j[j], inside[j])
            return None
    _ties_redo_kernel(idx, taus, bvals, thr, np.float32(params.lambda_), params.sign == "count", dst)
    return [float(v) for v in thr]
