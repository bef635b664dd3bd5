"""The shared building blocks of the fused kernels: loading bf16/float32 values from raw tiles and storing them
in the output dtype, torch.sign, DARE's hash on 32-bit lanes, the task-vector rows of a sub-block, the mask of
flagged elements in a group of 64, the finiteness check, and the scan for NaN/inf in stored bytes. numba inlines
them into each kernel (mergescale.merge.kernels.merging, .ties and .selection), so they cost nothing at run time.

The kernels work on sub-blocks of SUB elements laid out as [expert, element] scratch rows, and every inner loop
runs over arrays sliced to the sub-block and indexed from 0: LLVM then vectorizes them (offset indices into whole
tiles defeat it, 5x slower), and per-element branches (DARE or not, trim or not, which sign rule) become per-row
ones.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, types
from numba.extending import intrinsic, overload

from mergescale.merge.masks import stream_keys

BLOCK = 1 << 14  # elements per parallel work item
SUB = 512  # elements per sub-block
# numba compiles a kernel once per argument type, and a tuple's length is part of its type: every expert count
# would pay its own compilation (~5-15 s per kernel, a minute for TIES with its selection, on every fresh node or
# install). Experts go in as a tuple of EXPERT_SLOTS arrays (the next power of two beyond that) plus their count;
# the kernels loop over the count, so the padding is never read.
EXPERT_SLOTS = 8

@functools.cache
def _cache_dir() -> str:
    """Where the compiled kernels are cached: numba keys a cached kernel by the file it is defined in, not by the
    files of the functions it inlines, so a change to this file alone would leave merging.py's cached kernels
    compiled from the old primitives. The directory is named by a digest of all the kernels' sources instead
    (under NUMBA_CACHE_DIR if set, else $MERGESCALE_CACHE/numba)."""
    sources = [Path(__file__).with_name(f"{m}.py") for m in ("primitives", "merging", "selection", "ties")]
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:16]
    root = numba.config.CACHE_DIR or os.path.join(
        os.environ.get("MERGESCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mergescale"), "numba")
    return os.path.join(root, f"kernels-{digest}")


def cached_jit(**options):
    """numba.njit(cache=True, **options), cached in `_cache_dir()`. numba picks a function's cache directory when
    it is decorated, so setting it around the decoration affects nothing else in the process."""

    def decorate(fn):
        before, numba.config.CACHE_DIR = numba.config.CACHE_DIR, _cache_dir()
        try:
            return njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = before

    return decorate


jit_parallel = cached_jit(parallel=True, nogil=True)
jit_serial = cached_jit(nogil=True)

def load(a, i):  # float32 value of element i of a raw tile (bf16 stored as uint16, or float32)
    pass

@overload(load, inline="always")
def _load_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: np.uint32(np.uint32(a[i]) << np.uint32(16)).view(np.float32)
    return lambda a, i: a[i]

def store(a, i, v):  # write float32 v as the output dtype
    pass

@overload(store, inline="always")
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
def sign(x):  # torch.sign for floats: (0 < x) - (x < 0)
    return np.float32(x > 0) - np.float32(x < 0)

@intrinsic
def mix32(typingctx, x):
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
def dare_hash32(typingctx, lo0, i, kj1, kh):
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


@njit(inline="always")
def tau_row(es, bw, row, m, dare, dare_thr, kj1, kj2, idx0, scale):
    """row[:m] = tau of one expert over a sub-block (es: its raw values, bw: the base's as float32), DARE'd as
    methods.dare when asked: (e - b) * keep * f32(1 / (1 - p)), idx0 the sub-block's first flat index."""
    for i in range(m):
        row[i] = load(es, i) - bw[i]
    if dare:
        lo0 = np.uint32(idx0 & np.uint64(0xFFFFFFFF))
        if np.uint64(lo0) + np.uint64(m) <= np.uint64(1 << 32):
            # hi32 of every index is the same: all-32-bit lanes (twice as many per vector as 64-bit ones)
            kh = np.uint32(idx0 >> np.uint64(32)) ^ kj2
            for i in range(m):
                h = dare_hash32(lo0, i, kj1, kh)
                row[i] = row[i] * np.float32(h >= dare_thr) * scale
        else:  # the sub-block crosses a multiple of 2**32
            for i in range(m):
                idx = idx0 + np.uint64(i)  # the element's flat index in its tensor
                h = mix32(np.uint32(idx & np.uint64(0xFFFFFFFF)) ^ kj1)
                h = mix32(h ^ np.uint32(idx >> np.uint64(32)) ^ kj2)
                row[i] = row[i] * np.float32(h >= dare_thr) * scale

@njit(inline="always")
def base_row(b, s0, m, brow):
    bs, bw = b[s0:s0 + m], brow[:m]
    for i in range(m):
        bw[i] = load(bs, i)
    return bw

@njit(inline="always")
def task_rows(b, e, s0, m, dare, dare_thr, k1, k2, first, scale, brow, tr, chk):
    """brow[:m] = base, tr[j, :m] = tau_j of elements s0..s0+m (see tau_row); chk[:m] += tau * 0, which is
    NaN exactly where some tau is not finite."""
    bw, c = base_row(b, s0, m, brow), chk[:m]
    for j in range(tr.shape[0]):
        row = tr[j, :m]
        tau_row(e[j][s0:s0 + m], bw, row, m, dare, dare_thr, np.uint32(k1[j]), np.uint32(k2[j]),
                 first + np.uint64(s0), scale)
        for i in range(m):
            c[i] += row[i] * np.float32(0.0)

@njit(inline="always")
def group_mask(flag, g0, m, sparse):
    """The 64-bit mask of which of flag[g0:min(m, g0 + 64)] are nonzero (bit i: element g0 + i). The callers walk
    its set bits (trailing_zeros, then mask &= mask - 1): the flagged elements are a few percent, and a branch per
    element costs ~2x the kernel. sparse (a constant at each call, so the branch folds away): most groups flag
    nothing, and an OR finds that cheaper than building the mask; where most groups flag something, the OR is a
    wasted pass."""
    gf = flag[g0:min(m, g0 + 64)]
    if sparse:
        any_ = gf[0]
        for i in range(1, gf.shape[0]):
            any_ |= gf[i]  # integer flags: nonzero iff some element is
        if any_ == 0:
            return np.uint64(0)
    mask = np.uint64(0)
    for i in range(gf.shape[0]):
        mask |= np.uint64(gf[i] != 0) << np.uint64(i)
    return mask


@njit(inline="always")
def finite(chk):
    ok = True
    for i in range(chk.shape[0]):
        ok &= chk[i] == 0.0
    return ok


@jit_serial
def _count_nonfinite_bf16(a):
    bad = 0
    for i in range(a.shape[0]):
        bad += (a[i] & np.uint16(0x7F80)) == np.uint16(0x7F80)
    return bad

@jit_serial
def _count_nonfinite_f32(a):
    bad = 0
    for i in range(a.shape[0]):
        bad += (a[i] & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    return bad

@jit_serial
def _exponent_carries(words, mask, carry):
    """OR over 64-bit words of ((word & mask) + carry), `mask` the exponent bits of each lane (a bf16 or float32
    value) and `carry` their lowest bit: a lane's exponent is all ones (NaN or inf) iff that sum carries into the
    lane's sign bit, and never past it. Two operations per 8 bytes: memory speed."""
    acc = np.uint64(0)
    for i in range(words.shape[0]):
        acc |= (words[i] & mask) + carry
    return acc


def slots(e) -> tuple[tuple, int]:
    """(the experts' arrays padded to a fixed tuple length with repeats of the first, how many are real)."""
    size = max(EXPERT_SLOTS, 1 << (len(e) - 1).bit_length())
    return tuple(e) + (e[0],) * (size - len(e)), len(e)


def work_items(n: int) -> int:
    """Contiguous work items per kernel call: a few per thread (load balance), none smaller than a BLOCK."""
    return max(1, min(4 * numba.get_num_threads(), n // BLOCK))


def dare_args(p: float, seed: int, name: str, n_experts: int, element_offset: int):
    """(dare?, threshold, k1s, k2s, first, 1/(1-p) as float32): the mask of masks.dare_keep_mask, element for
    element."""
    if p <= 0.0:
        z = np.zeros(n_experts, np.uint32)
        return False, np.uint32(0), z, z, np.uint64(0), np.float32(1.0)
    keys = [stream_keys(seed, i, name) for i in range(n_experts)]
    return (True, np.uint32(min(int(round(p * 2**32)), 2**32 - 1)), np.array([k[0] for k in keys], np.uint32),
            np.array([k[1] for k in keys], np.uint32), np.uint64(element_offset), np.float32(1.0 / (1.0 - p)))


# (exponent bits, their lowest bit, sign bits) of each lane of a 64-bit word, by the lanes' bit dtype
_LANES = {np.dtype(np.uint16): (0x7F807F807F807F80, 0x0080008000800080, 0x8000800080008000),
          np.dtype(np.uint32): (0x7F8000007F800000, 0x0080000000800000, 0x8000000080000000)}


def count_nonfinite(bits: np.ndarray) -> int:
    """Number of NaN/inf values in a flat contiguous array of bf16 bits (uint16) or float32 bits (uint32): every
    64-bit word is checked at memory speed first (`_exponent_carries`; ~3x faster than counting bf16 values one
    by one), and values are counted only where that finds some."""
    count = _count_nonfinite_bf16 if bits.dtype == np.uint16 else _count_nonfinite_f32
    body = len(bits) - len(bits) % (8 // bits.itemsize)
    if body and bits.ctypes.data % 8 == 0:
        mask, carry, sign = _LANES[bits.dtype]
        if not _exponent_carries(bits[:body].view(np.uint64), np.uint64(mask), np.uint64(carry)) & sign:
            return int(count(bits[body:])) if body < len(bits) else 0
    return int(count(bits))
