"""Counter-based random numbers: a DARE keep-mask that is a pure function of (seed, expert, tensor, element).

Other tools draw DARE masks from a global RNG, so the mask depends on execution order, tile size and how many
workers ran. Here each element's uniform is a hash of its coordinates, so merging a tensor whole, in any row
slicing, in any order, on any number of actors gives identical bytes.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch only inside the functions that use it: the fused kernels import stream_keys in processes without torch.

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)


def _mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32 (Chris Wellons): a bijective 32-bit mixer with low bias; in place on a uint32 array."""
    x ^= x >> np.uint32(16)
    x *= _M1
    x ^= x >> np.uint32(15)
    x *= _M2
    x ^= x >> np.uint32(16)
    return x


def stream_keys(seed: int, expert: int, tensor_name: str) -> tuple[int, int]:
    """Two 32-bit keys for one (seed, expert, tensor) stream; blake2b so names never collide in practice."""
    digest = hashlib.blake2b(f"{seed}\x00{expert}\x00{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def uniform_bits_reference(seed: int, expert: int, tensor_name: str, start: int, count: int) -> np.ndarray:
    """uint32 hash for flat element indices start..start+count-1 of one tensor of one expert (the definition).

    h(i) = mix(mix(lo32(i) ^ k1) ^ hi32(i) ^ k2): two rounds so tensors over 2**32 elements stay distinct.
    `uniform_bits` computes the same bits faster; this plain numpy form is kept as the specification (tests).
    """
    k1, k2 = stream_keys(seed, expert, tensor_name)
    idx = np.arange(start, start + count, dtype=np.uint64)
    h = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    h ^= np.uint32(k1)
    _mix32(h)
    h ^= (idx >> np.uint64(32)).astype(np.uint32)
    h ^= np.uint32(k2)
    return _mix32(h)


def _s32(x: int) -> int:
    """The int32 whose bits are the uint32 x."""
    x &= 0xFFFFFFFF
    return x - 2**32 if x >= 2**31 else x


def _shift_xor_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> None:
    """x ^= x >> shift (logical) on int32 bits: arithmetic shift, then clear the copies of the sign bit."""
    import torch

    torch.bitwise_right_shift(x, shift, out=tmp)
    tmp.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(tmp)


_M1_S32, _M2_S32 = _s32(0x7FEB352D), _s32(0x846CA68B)


def _mix32_torch_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """lowbias32 in place on int32 bits. int32 multiplication keeps the low 32 bits of the product (two's
    complement wrap-around, as ATen's vector and scalar kernels do), i.e. exactly the uint32 product's bits;
    torch's uint32 multiply is a slow generic loop, about 15x slower. tests check the bits against numpy."""
    _shift_xor_(x, 16, tmp)
    x.mul_(_M1_S32)
    _shift_xor_(x, 15, tmp)
    x.mul_(_M2_S32)
    _shift_xor_(x, 16, tmp)


# Elements hashed per step: small enough that the ~14 in-place passes over a chunk stay in cache.
HASH_CHUNK = 1 << 16
_ARANGE: list[torch.Tensor] = []


def _hash_chunk_(h: torch.Tensor, tmp: torch.Tensor, k1: int, k2: int, first: int) -> None:
    """Fill int32 `h` with the hash bits of flat indices first..first+len(h)-1 (`tmp`: int32 scratch, same length)."""
    import torch

    n = h.numel()
    lo = first & 0xFFFFFFFF
    if lo + n > 2**32:  # the chunk crosses a multiple of 2**32: two runs, each with one value of hi32(i)
        cut = 2**32 - lo
        _hash_chunk_(h[:cut], tmp[:cut], k1, k2, first)
        _hash_chunk_(h[cut:], tmp[cut:], k1, k2, first + cut)
        return
    if not _ARANGE or _ARANGE[0].numel() < n:
        _ARANGE[:] = [torch.arange(max(n, HASH_CHUNK), dtype=torch.int32)]
    torch.add(_ARANGE[0][:n], _s32(lo), out=h)  # lo32(i); wraps past 2**31 like uint32 bits
    h.bitwise_xor_(_s32(k1))
    _mix32_torch_(h, tmp)
    h.bitwise_xor_(_s32((first >> 32) ^ k2))
    _mix32_torch_(h, tmp)


def uniform_bits_torch(seed: int, expert: int, tensor_name: str, start: int, count: int) -> torch.Tensor:
    """The bits of `uniform_bits_reference` as a uint32 tensor, computed in cache-sized chunks with torch."""
    import torch

    k1, k2 = stream_keys(seed, expert, tensor_name)
    out = torch.empty(count, dtype=torch.int32)
    tmp = torch.empty(min(count, HASH_CHUNK), dtype=torch.int32)
    for s in range(0, count, HASH_CHUNK):
        n = min(HASH_CHUNK, count - s)
        _hash_chunk_(out[s:s + n], tmp[:n], k1, k2, start + s)
    return out.view(torch.uint32)


def uniform_bits(seed: int, expert: int, tensor_name: str, start: int, count: int) -> np.ndarray:
    """uint32 hash for flat element indices start..start+count-1 of one tensor of one expert (as numpy)."""
    return uniform_bits_torch(seed, expert, tensor_name, start, count).numpy()


def dare_keep_mask(seed: int, expert: int, tensor_name: str, start: int, shape: tuple[int, ...],
                   p: float) -> torch.Tensor:
    """Bool mask (True = keep) for a tile whose first element has flat index `start` in its tensor.

    An element is dropped with probability p: kept iff its hash >= p * 2**32 (exact integer threshold).
    """
    import torch

    count = 1
    for s in shape:
        count *= s
    if p <= 0.0:
        return torch.ones(shape, dtype=torch.bool)
    threshold = min(int(round(p * 2**32)), 2**32 - 1)
    k1, k2 = stream_keys(seed, expert, tensor_name)
    keep = torch.empty(count, dtype=torch.bool)
    h = torch.empty(min(count, HASH_CHUNK), dtype=torch.int32)
    tmp = torch.empty(min(count, HASH_CHUNK), dtype=torch.int32)
    for s in range(0, count, HASH_CHUNK):
        n = min(HASH_CHUNK, count - s)
        _hash_chunk_(h[:n], tmp[:n], k1, k2, start + s)
        # unsigned h >= threshold, as a signed compare of both sides shifted by -2**31 (flip the top bit)
        torch.ge(h[:n].bitwise_xor_(-(2**31)), threshold - 2**31, out=keep[s:s + n])
    return keep.reshape(shape)
