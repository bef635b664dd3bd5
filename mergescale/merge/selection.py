"""Exact streaming k-th order statistics of non-negative float32 values, in exactly two passes.

Non-negative IEEE-754 floats order the same way as their bit patterns read as int32, so the k-th smallest
value is found by a radix select: pass 1 histograms the high 16 bits of every value (one 32768-bin histogram
per query stream), which fixes the high half of the answer and how many values lie below it; pass 2 histograms
the low 16 bits of only the values inside that bucket, which fixes the rest. Memory is O(bins), never the
data; histograms from different tiles, tensors or Ray actors add up, so the same code is the single-process
path and the distributed one (actors send histograms, the coordinator adds them).

The result equals `torch.kthvalue(torch.cat(all values), k)` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HI_BINS = 1 << 15  # sign bit is 0 for |x|, so high halves lie in [0, 2**15)
LO_BINS = 1 << 16


def _bits(values: torch.Tensor) -> torch.Tensor:
    if values.dtype != torch.float32:
        raise TypeError(f"selection works on float32 magnitudes, got {values.dtype}")
    return values.reshape(-1).view(torch.int32)


def hi_histogram(values: torch.Tensor) -> torch.Tensor:
    """Pass-1 contribution: counts of the high 16 bits of non-negative float32 values."""
    hi = torch.bitwise_right_shift(_bits(values), 16)
    # Histograms live on the CPU whatever device the values are on: they are tiny, and adding those of many
    # tiles, tensors and actors must not care where each was computed.
    return torch.bincount(hi, minlength=HI_BINS).to("cpu", torch.int64)


def lo_histogram(values: torch.Tensor, hi_bucket: int) -> torch.Tensor:
    """Pass-2 contribution: counts of the low 16 bits of the values whose high 16 bits equal `hi_bucket`."""
    bits = _bits(values)
    inside = bits[torch.bitwise_right_shift(bits, 16) == hi_bucket]
    return torch.bincount(torch.bitwise_and(inside, 0xFFFF), minlength=LO_BINS).to("cpu", torch.int64)


def locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th smallest (1-based) and the rank of the answer inside that bucket."""
    cum = torch.cumsum(hist, 0)
    total = int(cum[-1])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} out of range for {total} values")
    bucket = int(torch.searchsorted(cum, torch.tensor(k, dtype=cum.dtype)))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    return bucket, k - below


def bits_to_float(hi: int, lo: int) -> float:
    return torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()


@dataclass
class KthQuery:
    """One order statistic of one stream of values (e.g. |tau| of expert 2 over the whole model)."""

    stream: object  # which stream of values this query reads, e.g. ("*", expert) or (tensor name, expert)
    k: int  # 1-based rank of the smallest value to find
    tag: str = ""  # what the caller calls this statistic, e.g. "min" or "max"
    hi_bucket: int | None = None
    rank_in_bucket: int | None = None
    value: float | None = None


@dataclass
class StreamingSelector:
    """Find several k-th smallest values over several value streams, fed tile by tile.

    Usage: `for tile: sel.add_pass1(stream, values)`; `sel.finish_pass1()`; `for tile: sel.add_pass2(stream,
    values)`; `sel.finish_pass2()`; read `q.value`. `merge_from` adds another selector's histograms (Ray).
    """

    queries: list[KthQuery]
    hi: dict = field(default_factory=dict)  # stream -> pass-1 histogram
    lo: dict = field(default_factory=dict)  # (stream, hi bucket) -> pass-2 histogram

    def add_pass1(self, stream, values: torch.Tensor) -> None:
        self.add_hi_histogram(stream, hi_histogram(values))

    def add_hi_histogram(self, stream, h: torch.Tensor) -> None:
        """Add a pass-1 histogram computed elsewhere (a fused kernel: the same counts as hi_histogram)."""
        self.hi[stream] = self.hi[stream] + h if stream in self.hi else h

    def finish_pass1(self) -> None:
        self._buckets: dict = {}
        for q in self.queries:
            q.hi_bucket, q.rank_in_bucket = locate(self.hi[q.stream], q.k)
            self._buckets.setdefault(q.stream, set()).add(q.hi_bucket)

    def pass2_buckets(self, stream) -> set[int]:
        return self._buckets.get(stream, set())

    def buckets(self) -> dict:
        """After pass 1: which high buckets each stream's pass 2 must histogram (sent to Ray actors)."""
        return {s: set(b) for s, b in self._buckets.items()}

    def set_buckets(self, buckets: dict) -> None:
        """Prepare a query-less selector (an actor's) to feed pass 2 for the coordinator's buckets."""
        self._buckets = {s: set(b) for s, b in buckets.items()}

    def add_pass2(self, stream, values: torch.Tensor) -> None:
        for bucket in self.pass2_buckets(stream):
            self.add_lo_histogram(stream, bucket, lo_histogram(values, bucket))

    def add_lo_histogram(self, stream, bucket: int, h: torch.Tensor) -> None:
        """Add a pass-2 histogram of one high bucket computed elsewhere (as lo_histogram would)."""
        key = (stream, bucket)
        self.lo[key] = self.lo[key] + h if key in self.lo else h

    def finish_pass2(self) -> None:
        for q in self.queries:
            lo_bucket, _ = locate(self.lo[(q.stream, q.hi_bucket)], q.rank_in_bucket)
            q.value = bits_to_float(q.hi_bucket, lo_bucket)

    def merge_from(self, other_hi: dict | None = None, other_lo: dict | None = None) -> None:
        for s, h in (other_hi or {}).items():
            self.hi[s] = self.hi[s] + h if s in self.hi else h.clone()
        for key, h in (other_lo or {}).items():
            self.lo[key] = self.lo[key] + h if key in self.lo else h.clone()


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """k-th smallest of one in-memory tensor (single-tile tensors): the same value the streaming path finds."""
    return torch.kthvalue(values.reshape(-1), k).values.item()
