"""The fused merge kernels: each merges a whole unit in one pass over its raw tiles, element by element in
registers, writing the output dtype directly. Families (methods.Kernel.merge), `merge` picks the kernel:
  average  sum_i w_i theta_i in float64 (/ sum w), rounded once          (methods: average)
  linear   theta_b + lambda * sum_i w_i tau_i, tau optionally DARE'd     (task_arithmetic, dare_linear)
  ties     theta_b + lambda * TIES(trim(tau_i)), tau optionally DARE'd   (ties, dare_ties; kernels.ties)
"""

from __future__ import annotations

import numpy as np
from numba import prange

from mergescale.merge.kernels.primitives import (
    BLOCK,
    SUB,
    dare_args,
    finite,
    jit_parallel,
    load,
    slots,
    store,
    task_rows,
    work_items,
)
from mergescale.merge.kernels.ties import _ties_kernel


@jit_parallel
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
            task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk)
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
                store(os, i, v)
        if not finite(chk):
            bad[0] = 1

@jit_parallel
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
                    c[i] += load(bs, i) * np.float32(0.0)
            acc, es, w0 = acc_[:m], e[0][s0:s0 + m], w[0]
            for i in range(m):
                acc[i] = np.float64(load(es, i)) * w0
            for j in range(1, ne):
                es, wj = e[j][s0:s0 + m], w[j]
                for i in range(m):
                    acc[i] += np.float64(load(es, i)) * wj
            if normalize:
                for i in range(m):
                    acc[i] *= inv_wsum
            c, os = chk[:m], out[s0:s0 + m]
            for i in range(m):
                v = np.float32(acc[i])
                c[i] += v * np.float32(0.0)
                store(os, i, v)
        if not finite(chk):
            bad[0] = 1


def merge(family: str, dare_p: float, params, weights: list[float], ctx, models: tuple, has_base: bool,
          dst: np.ndarray) -> bool:
    """Merge a unit (flat arrays of one stored dtype, base first when has_base) into `dst` (the output dtype's flat
    array) with the kernel of `family`. `ctx` gives the unit's name, seed, element_offset and, for TIES, its
    thresholds. False: a non-finite value (the caller merges the unit with the torch definition)."""
    bad = np.zeros(1, np.uint8)
    b, e = (models[0], models[1:]) if has_base else (models[0][:0], models)
    if family == "average":
        w = np.array(weights, np.float64)
        _average_kernel(*slots(e), b, w, bool(params.normalize), 1.0 / float(sum(weights)), dst, bad)
        return not bad[0]
    dare, dthr, k1, k2, first, scale = dare_args(dare_p, ctx.seed, ctx.name, len(e), ctx.element_offset)
    lam = np.float32(params.lambda_)
    if family == "linear":
        _linear_kernel(b, *slots(e), np.array(weights, np.float32), lam, dare, dthr, k1, k2, first, scale, dst, bad)
    else:
        thr = np.array([t.get("min", 0.0) for t in ctx.thresholds] if ctx.thresholds else [0.0] * len(e), np.float32)
        none = np.empty(0, np.float32)
        T = work_items(b.shape[0])
        _ties_kernel(b, *slots(e), thr, lam, params.sign == "count", dare, dthr, k1, k2, first, scale, none, none,
                     np.zeros((T, len(e)), np.int64), np.empty((T, 0), np.int64), np.zeros(T, np.int64), dst, bad)
    return not bad[0]
