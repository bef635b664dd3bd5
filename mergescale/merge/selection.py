"""Exact streaming k-th order statistics of non-negative float32 values, in one to three passes.

Non-negative IEEE-754 floats order the same way as their bit patterns read as int32, so the k-th smallest
value can be found by counting bit patterns. Each pass counts, for every query, the values below a *window* of
bit patterns and a histogram of the window (bins of 2**shift patterns). If the k-th value falls in a bin one
pattern wide, that is the answer; if in a wider bin, the next pass looks at that bin only; if outside the
window, the next pass starts over from the whole range. The whole range in 2**15 bins of 2**16 patterns, then
one bin in 2**16 patterns, is the classic two-pass radix select; a window from a sample (see
`window_around`) usually finds the answer in one pass. Memory is O(bins), never the data; counts from
different tiles, tensors or Ray actors add up, so the same code is the single-process path and the
distributed one (actors send counts, the coordinator adds them).

The result equals `torch.kthvalue(torch.cat(all values), k)` exactly, whatever the first window was.

Counts are numpy arrays and torch is imported only where values are histogrammed (`window_histogram`,
`kth_smallest`): a Ray coordinator that adds its actors' counts and resolves the queries never loads torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

HI_BINS = 1 << 15  # sign bit is 0 for |x|, so high halves lie in [0, 2**15)
WINDOW_BINS = 1 << 18  # a window from a sample: 2 MB of int64 counts per stream, 1 MB of int32 in a kernel


@dataclass(frozen=True)
class Window:
    """Bit patterns [start, start + bins * 2**shift), counted in `bins` bins of 2**shift patterns each."""

    start: int
    shift: int
    bins: int

    @property
    def end(self) -> int:
        return self.start + (self.bins << self.shift)

    def refine(self, bucket: int) -> "Window":
        """The window of one bin of this one: 2**16 bins (radix pass 2), one pattern wide if it can be."""
        shift = max(0, self.shift - 16)
        return Window(self.start + (bucket << self.shift), shift, 1 << (self.shift - shift))


RADIX = Window(0, 16, HI_BINS)  # every non-negative float: the high 16 bits


def window_around(lo: float, hi: float) -> Window:
    """The narrowest window of WINDOW_BINS bins that holds [lo, hi] (a sample's bracket around the answer)."""
    lb, hb = float_bits(lo), float_bits(min(hi, math.inf))
    shift = max(0, math.ceil(math.log2((hb - lb + 1) / WINDOW_BINS)))
    return Window(lb, shift, WINDOW_BINS)


def bracket_positions(size: int, k: int, n: int) -> tuple[int | None, int | None]:
    """Positions, in a sorted sample of `size` of n values, of a bracket around the k-th smallest: 4 standard
    deviations of the sample quantile's rank either side, plus 32 sample values. None for an open end, where the
    sample may have missed the extremes."""
    pos = min(size - 1, k * size // n)
    margin = int(4 * (size * (pos + 1) / size * (1 - pos / size)) ** 0.5) + 32
    return (pos - margin if pos - margin > 0 else None), (pos + margin if pos + margin < size - 1 else None)


def sample_bracket(sorted_sample, k: int, n: int) -> tuple[float, float]:
    """(lo, hi) around the k-th smallest of n values, from a sorted sample of them (bracket_positions), open at the
    ends ([0, ..], [.., inf]). Very likely, not certainly, holds the answer: callers check by counting."""
    lo_pos, hi_pos = bracket_positions(len(sorted_sample), k, n)
    lo = float(sorted_sample[lo_pos]) if lo_pos is not None else 0.0
    hi = float(sorted_sample[hi_pos]) if hi_pos is not None else math.inf
    return lo, hi


def float_bits(x: float) -> int:
    """The int32 bit pattern of x rounded to float32 (as torch.tensor([x], dtype=torch.float32) rounds it)."""
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as torch gives
        return int(np.array([x], np.float32).view(np.int32)[0])


def bits_to_float(bits: int) -> float:
    return float(np.array([bits], np.int32).view(np.float32)[0])


def window_histogram(values: torch.Tensor, w: Window) -> tuple[int, torch.Tensor]:
    """(number of values below the window, int64 histogram of the window's bins) of non-negative float32 values."""
    import torch

    if values.dtype != torch.float32:
        raise TypeError(f"selection works on float32 magnitudes, got {values.dtype}")
    bits = values.reshape(-1).view(torch.int32).to(torch.int64)
    offset = bits - w.start
    inside = offset[(offset >= 0) & (offset < (w.bins << w.shift))]
    # Counts live on the CPU whatever device the values are on: they are small, and adding those of many tiles,
    # tensors and actors must not care where each was computed.
    hist = torch.bincount(torch.bitwise_right_shift(inside, w.shift), minlength=w.bins).to("cpu", torch.int64)
    return int((offset < 0).sum()), hist


def locate(hist: np.ndarray, r: int) -> int:
    """Bin holding the r-th smallest (1-based) value counted in hist (1 <= r <= hist.sum())."""
    return int(np.searchsorted(np.cumsum(hist), r))


def as_counts(hist) -> np.ndarray:
    """A histogram as an int64 numpy array: from numpy, a CPU torch tensor, or a SparseCounts."""
    if isinstance(hist, SparseCounts):
        return hist.dense()
    if hasattr(hist, "numpy"):  # a torch tensor (window_histogram keeps its counts on the CPU)
        hist = hist.numpy()
    return np.asarray(hist, dtype=np.int64)


@dataclass(frozen=True)
class SparseCounts:
    """A mostly-empty histogram as its nonzero bins (what an actor sends: a narrow window of bf16 task vectors
    touches a few thousand of its 2**18 bins)."""

    bins: int
    index: np.ndarray
    count: np.ndarray

    @classmethod
    def of(cls, hist: np.ndarray) -> "SparseCounts":
        index = np.flatnonzero(hist)
        return cls(len(hist), index, hist[index])

    def dense(self) -> np.ndarray:
        out = np.zeros(self.bins, np.int64)
        out[self.index] = self.count
        return out


@dataclass
class KthQuery:
    """One order statistic of one stream of values (e.g. |tau| of expert 2 over the whole model)."""

    stream: object  # which stream of values this query reads, e.g. ("*", expert) or (tensor name, expert)
    k: int  # 1-based rank of the smallest value to find
    tag: str = ""  # what the caller calls this statistic, e.g. "min" or "max"
    window: Window = RADIX  # what the next pass counts for this query
    value: float | None = None
    passes: int = 0


@dataclass
class StreamingSelector:
    """Find several k-th smallest values over several value streams, fed tile by tile, pass after pass.

    Usage: optionally `q.window = window_around(..)` from a sample; then `while not sel.done: for tile:
    sel.add_values(stream, values); sel.finish_pass()`; read `q.value`. `finish_stream(s)` as soon as a stream's
    last tile of the pass is in bounds memory. For Ray: the coordinator sends `sel.windows()` to actors, whose
    query-less selectors `use_windows(..)`, count their tiles and return `.sparse_counts()`; the coordinator adds
    them with `merge_from`.
    """

    queries: list[KthQuery]
    counts: dict = field(default_factory=dict)  # (stream, Window) -> [values below, histogram]
    _windows: dict | None = None
    _finished: set = field(default_factory=set)  # streams finished early this pass (finish_stream)

    @property
    def done(self) -> bool:
        return all(q.value is not None for q in self.queries)

    def windows(self) -> dict:
        """stream -> the windows this pass counts (a query-less selector: those it was given)."""
        if self._windows is not None:
            return self._windows
        out: dict = {}
        for q in self.queries:
            if q.value is None and q.window not in out.setdefault(q.stream, []):
                out[q.stream].append(q.window)
        return out

    def use_windows(self, windows: dict) -> None:
        self._windows = {s: list(ws) for s, ws in windows.items()}
        self.counts = {}

    def add_values(self, stream, values: torch.Tensor) -> None:
        for w in self.windows().get(stream, ()):
            self.add_counts(stream, w, *window_histogram(values, w))

    def expert_windows(self, n: int, stream_of) -> list[list[Window]]:
        """[i]: the windows of expert i's stream `stream_of(i)`, for i < n (what a fused kernel counts per expert)."""
        windows = self.windows()
        return [windows.get(stream_of(i), []) for i in range(n)]

    def add_expert_counts(self, stream_of, windows: list[list[Window]], counts) -> None:
        """Add a fused kernel's counts: counts[i][q] = (values below, bins) of expert i in its window windows[i][q]."""
        for i, per_window in enumerate(counts):
            for w, (below, hist) in zip(windows[i], per_window):
                self.add_counts(stream_of(i), w, below, hist)

    def add_counts(self, stream, w: Window, below: int, hist) -> None:
        """Add one tile's counts for a window, computed here or elsewhere (a fused kernel, another actor): hist
        is an int64 numpy array, a CPU torch tensor or a SparseCounts."""
        key = (stream, w)
        if key in self.counts:
            acc = self.counts[key]
            acc[0] += below
            if isinstance(hist, SparseCounts):
                acc[1][hist.index] += hist.count
            else:
                acc[1] += as_counts(hist)
        else:
            self.counts[key] = [below, as_counts(hist).copy()]

    def merge_from(self, counts: dict) -> None:
        for (stream, w), (below, hist) in counts.items():
            self.add_counts(stream, w, below, hist)

    def sparse_counts(self) -> dict:
        """.counts with mostly-empty histograms as SparseCounts (what an actor sends)."""
        return {key: (below, SparseCounts.of(hist) if np.count_nonzero(hist) * 4 < len(hist) else hist)
                for key, (below, hist) in self.counts.items()}

    def finish_stream(self, stream) -> None:
        """Every value of `stream` has been counted this pass: narrow (or resolve) its queries and drop its counts.
        Calling this as soon as a stream is complete keeps memory to the streams being fed (a per-tensor selection
        of a 70B model has thousands of streams; counts for all of them at once would be gigabytes)."""
        self._finished.add(stream)
        for q in self.queries:
            if q.value is not None or q.stream != stream:
                continue
            below, hist = self.counts.get((q.stream, q.window), (0, np.zeros(q.window.bins, np.int64)))
            inside = int(hist.sum())
            q.passes += 1
            r = q.k - below
            if 1 <= r <= inside:
                bucket = locate(hist, r)
                if q.window.shift == 0:
                    q.value = bits_to_float(q.window.start + bucket)
                else:
                    q.window = q.window.refine(bucket)
            elif q.window == RADIX:  # holds every value: the rank itself is impossible
                raise ValueError(f"k={q.k} out of range for {below + inside} values")
            else:  # the sample's bracket missed: start over from the whole range
                q.window = RADIX
        for key in [key for key in self.counts if key[0] == stream]:
            del self.counts[key]

    def finish_pass(self) -> bool:
        """Finish every stream not finished yet this pass; True when all queries are resolved."""
        for stream in dict.fromkeys(q.stream for q in self.queries if q.value is None):
            if stream not in self._finished:
                self.finish_stream(stream)
        self.counts, self._finished = {}, set()
        return self.done


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """k-th smallest of one in-memory tensor (single-tile tensors): the same value the streaming path finds."""
    import torch

    return torch.kthvalue(values.reshape(-1), k).values.item()
