"""Counter-based random numbers: a DARE keep-mask that is a pure function of (seed, expert, tensor, element).

Other tools draw DARE masks from a global RNG, so the mask depends on execution order, tile size and how many
workers ran. Here each element's uniform is a hash of its coordinates, so merging a tensor whole, in any row
slicing, in any order, on any number of actors gives identical bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

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


def uniform_bits(seed: int, expert: int, tensor_name: str, start: int, count: int) -> np.ndarray:
    """uint32 hash for flat element indices start..start+count-1 of one tensor of one expert.

    h(i) = mix(mix(lo32(i) ^ k1) ^ hi32(i) ^ k2): two rounds so tensors over 2**32 elements stay distinct.
    """
    k1, k2 = stream_keys(seed, expert, tensor_name)
    idx = np.arange(start, start + count, dtype=np.uint64)
    h = (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    h ^= np.uint32(k1)
    _mix32(h)
    h ^= (idx >> np.uint64(32)).astype(np.uint32)
    h ^= np.uint32(k2)
    return _mix32(h)


def dare_keep_mask(seed: int, expert: int, tensor_name: str, start: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool mask (True = keep) for a tile whose first element has flat index `start` in its tensor.

    An element is dropped with probability p: kept iff its hash >= p * 2**32 (exact integer threshold).
    """
    count = 1
    for s in shape:
        count *= s
    if p <= 0.0:
        return torch.ones(shape, dtype=torch.bool)
    threshold = np.uint32(min(int(round(p * 2**32)), 2**32 - 1))
    keep = uniform_bits(seed, expert, tensor_name, start, count) >= threshold
    return torch.from_numpy(keep).reshape(shape)
