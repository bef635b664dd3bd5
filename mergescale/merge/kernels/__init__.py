"""Fused CPU kernels: the methods' math compiled with numba, one pass over the raw tiles.

The torch definitions (mergescale.merge.methods, torch_math) are the reference: readable, used on accelerators
and for anything not here. On the CPU, ATen runs a TIES merge as dozens of separate passes over float32 copies of
every tile (and DARE's hash as dozens more), which made a small node's merge compute-bound at several times its
I/O time. These kernels read bf16/float32 tiles as stored, do every step for one element in registers, and write
the output dtype directly; numba spreads the elements over the process's threads.

Bit for bit: each kernel performs exactly the float32 (or float64) operations of the torch function it replaces,
in the same order, rounding each step (numba's default: no fast-math, so no reassociation and no FMA
contraction), or operations shown to round to the same bits (the per-sign sums of ties._ties4, argued there).
tests/merge/test_kernels.py checks every kernel against the torch definitions with torch.equal. Where the torch
path special-cases non-finite values (TIES's fast path, NaN payloads, bf16 NaN encoding), a kernel reports "not
finite" and the caller merges that unit with the torch definition.

  primitives  loads, stores, DARE's hash, task-vector rows, the finiteness check, the NaN/inf scan
  merging     the merge kernels (average, linear) and `merge`, which picks a unit's kernel
  ties        TIES: trim, elect, disjoint mean; also against sampled threshold brackets, then the listed redo
  selection   counting magnitudes for the exact selection, sampling them, order statistics of a few
  dispatch    which kernel a method's declaration (methods.Kernel) asks for; the API below; warm_up

No torch here, and numba only if installed (without it every entry point says "not handled").
"""

from mergescale.merge.kernels.dispatch import (
    RAW_CODES,
    available,
    bracketed_tile,
    count_nonfinite,
    finish_bracketed,
    histograms,
    magnitudes,
    merge,
    select_and_merge,
    set_threads,
    warm_up,
)

__all__ = ["RAW_CODES", "available", "bracketed_tile", "count_nonfinite", "finish_bracketed", "histograms",
           "magnitudes", "merge", "select_and_merge", "set_threads", "warm_up"]
