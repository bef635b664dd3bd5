"""The streaming k-th order statistic (windowed counting passes) and the counter-based DARE mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergescale.merge.masks import dare_keep_mask
from mergescale.merge.methods import breadcrumbs_ranks, ties_ranks
from mergescale.merge.selection import (
    RADIX,
    KthQuery,
    SparseCounts,
    StreamingSelector,
    float_bits,
    kth_smallest,
    sample_bracket,
    window_around,
    window_histogram,
)


def run_selector(tiles_by_stream: dict, ks_by_stream: dict, windows: dict | None = None) -> dict:
    """Feed tiles pass after pass until every query is resolved; return {(stream, k): value}. `windows` places
    first windows ((stream, k) -> Window), as a sample would."""
    queries = [KthQuery(s, k) for s, ks in ks_by_stream.items() for k in ks]
    for q in queries:
        q.window = (windows or {}).get((q.stream, q.k), q.window)
    sel = StreamingSelector(queries)
    for _ in range(3):  # never more than three passes
        for s, tiles in tiles_by_stream.items():
            for t in tiles:
                sel.add_values(s, t)
        if sel.finish_pass():
            break
    assert sel.done
    return {(q.stream, q.k): q.value for q in queries}


def split(v: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    cuts = sorted({min(max(c, 0), v.numel()) for c in cuts})
    edges = [0, *cuts, v.numel()]
    return [v[a:b] for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("seed", range(3))
def test_selector_equals_kthvalue_on_random_tensors(seed):
    """Many tensor sizes (1 .. 50k), with zeros, duplicates and values spanning many binades, one stream per expert."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 3, 7, 64, 127, 1000, 4097, 50_000]
    streams = {}
    for s in range(2):
        tiles = []
        for n in sizes:
            t = torch.randn(n, generator=g).abs() * torch.exp(torch.randn(n, generator=g) * 4)
            t[torch.rand(n, generator=g) < 0.1] = 0.0  # zeros (DARE-dropped entries)
            dup = torch.rand(n, generator=g) < 0.2
            t[dup] = 0.125  # one heavily duplicated value
            tiles.append(t.to(torch.float32))
        streams[s] = tiles
    ks = {}
    for s, tiles in streams.items():
        n = sum(t.numel() for t in tiles)
        ks[s] = sorted({1, 2, n // 3, n // 2, n - 1, n, *torch.randint(1, n + 1, (5,), generator=g).tolist()})
    got = run_selector(streams, ks)
    for s, tiles in streams.items():
        flat = torch.cat(tiles)
        for k in ks[s]:
            assert got[(s, k)] == torch.kthvalue(flat, k).values.item(), (s, k)


magnitudes = st.one_of(
    st.floats(min_value=0.0, max_value=2.0**100, width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, 1.0, 0.5, 1e-3, 1e-40, 3.4e38]),  # duplicates, subnormal, near float32 max
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(magnitudes, min_size=1, max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
    data=st.data(),
)
def test_selector_property(values, cuts, data):
    v = torch.tensor(values, dtype=torch.float32)
    ks = data.draw(st.lists(st.integers(1, v.numel()), min_size=1, max_size=4))
    got = run_selector({"s": split(v, cuts)}, {"s": ks})
    for k in ks:
        assert got[("s", k)] == torch.kthvalue(v, k).values.item()
        assert got[("s", k)] == kth_smallest(v, k)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(magnitudes, min_size=1, max_size=300),
    data=st.data(),
)
def test_selector_with_any_first_window_is_exact(values, data):
    """Whatever window a sample proposes (right, too narrow, too wide, wrong place), the answer is exact, in at
    most three passes."""
    v = torch.tensor(values, dtype=torch.float32)
    ks = data.draw(st.lists(st.integers(1, v.numel()), min_size=1, max_size=4))
    lo_hi = data.draw(st.lists(st.sampled_from(values + [0.0, 1e-30, 1e30, math.inf]), min_size=2, max_size=2))
    lo, hi = sorted(lo_hi)
    windows = {("s", k): window_around(lo, hi) for k in ks}
    got = run_selector({"s": [v[: len(v) // 2], v[len(v) // 2:]]}, {"s": ks}, windows)
    for k in ks:
        assert got[("s", k)] == torch.kthvalue(v, k).values.item()


def test_window_around_a_sampled_bracket_takes_one_pass():
    g = torch.Generator().manual_seed(3)
    v = torch.randn(200_000, generator=g).abs()
    k = 160_000
    sample = torch.sort(v[::2]).values  # 100000 values: 4 sd of the rank of the 0.8 quantile is 506
    q = KthQuery("s", k, window=window_around(sample[80000 - 540].item(), sample[80000 + 540].item()))
    sel = StreamingSelector([q])
    sel.add_values("s", v)
    assert q.window.shift == 0  # the bracket spans fewer bit patterns than a window's bins: one pass
    assert sel.finish_pass() and q.passes == 1
    assert q.value == torch.kthvalue(v, k).values.item()


def test_window_histogram_counts():
    v = torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 3.0, math.inf])
    w = window_around(1.0, 2.0)  # 2**23 + 1 patterns: bins of 2**6, the window reaches up to 4.0
    below, hist = window_histogram(v, w)
    assert (w.shift, w.end) == (6, float_bits(4.0))
    assert below == 2 and int(hist.sum()) == 4 and hist.shape == (w.bins,)
    assert int(hist[0]) == 2 and int(hist[(float_bits(3.0) - w.start) >> 6]) == 1
    below, hist = window_histogram(v, RADIX)
    assert below == 0 and int(hist.sum()) == 7


def test_selector_counts_merge_across_workers():
    """Counts of disjoint tiles fed to separate selectors and added (as Ray actors do) give the same answer."""
    g = torch.Generator().manual_seed(9)
    tiles = [torch.rand(n, generator=g) * 10 for n in (10, 300, 4000, 7)]
    flat = torch.cat(tiles)
    k = 1234
    main = StreamingSelector([KthQuery("s", k)])
    while not main.done:
        workers = [StreamingSelector([]) for _ in range(2)]
        for w in workers:
            w.use_windows(main.windows())
        for i, t in enumerate(tiles):
            workers[i % 2].add_values("s", t)
        for w in workers:  # what an actor sends: mostly-empty histograms as their nonzero bins
            sent = w.sparse_counts()
            assert all(isinstance(h, SparseCounts) for _, h in sent.values())  # 4011 values in 2**15+ bins
            main.merge_from(sent)
        main.finish_pass()
    assert main.queries[0].value == torch.kthvalue(flat, k).values.item()
    assert main.queries[0].passes == 2  # from the whole range: the two-pass radix select


def test_sparse_counts_add_as_dense_ones():
    """SparseCounts (an actor's mostly-empty histogram) adds into a selector exactly as the dense numpy array or
    torch tensor it came from, in either order of arrival."""
    rng = np.random.default_rng(3)
    w = window_around(1.0, 2.0)
    dense = [np.where(rng.random(w.bins) < p, rng.integers(0, 50, w.bins), 0).astype(np.int64) for p in (0.01, 0.9)]
    want = dense[0] + dense[1]
    for first, second in ((SparseCounts.of(dense[0]), torch.from_numpy(dense[1])),
                          (dense[1], SparseCounts.of(dense[0])),
                          (SparseCounts.of(dense[1]), SparseCounts.of(dense[0]))):
        sel = StreamingSelector([])
        sel.use_windows({"s": [w]})
        sel.merge_from({("s", w): (3, first)})
        sel.merge_from({("s", w): (4, second)})
        below, hist = sel.counts[("s", w)]
        assert below == 7 and hist.dtype == np.int64 and np.array_equal(hist, want)
    assert np.array_equal(SparseCounts.of(dense[0]).dense(), dense[0])


def test_selector_rejects_out_of_range_rank_and_non_float32():
    sel = StreamingSelector([KthQuery("s", 11)])
    sel.add_values("s", torch.rand(10))
    with pytest.raises(ValueError, match="k=11 out of range for 10 values"):
        sel.finish_pass()
    with pytest.raises(TypeError, match="float32"):
        StreamingSelector([KthQuery("s", 1)]).add_values("s", torch.rand(10, dtype=torch.float64))


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
def test_ties_ranks_match_reference_topk(density):
    n = 1000
    kept = math.floor(density * n)
    assert ties_ranks(density)(n) == {"min": None if kept >= n else n - kept}


@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.3), (0.8, 0.5), (1.0, 0.1), (0.3, 0.0)])
def test_breadcrumbs_ranks_keep_mergekit_count(density, gamma):
    """With distinct magnitudes the thresholds keep exactly mergekit's floor(density n) entries."""
    n = 997
    v = torch.randperm(n).to(torch.float32) + 1.0
    r = breadcrumbs_ranks(density, gamma)(n)
    keep = torch.ones(n, dtype=torch.bool)
    if r["min"] is not None:
        keep &= v >= torch.kthvalue(v, r["min"]).values
    if r["max"] is not None:
        keep &= v < torch.kthvalue(v, r["max"]).values
    assert int(keep.sum()) == (n if density >= 1 else math.floor(density * n))


# ----------------------------------------------------------------------------------------------------------
# DARE mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_dare_mask_keeps_one_minus_p(p):
    keep = dare_keep_mask(0, 1, "model.layers.0.mlp.up_proj.weight", 0, (1000, 1000), p)
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    sd = math.sqrt(p * (1 - p) / 1e6)
    assert abs(float(keep.float().mean()) - (1 - p)) < 6 * sd


def test_dare_mask_p_zero_keeps_all_and_streams_differ():
    assert bool(dare_keep_mask(0, 0, "w", 0, (50, 7), 0.0).all())
    a = dare_keep_mask(0, 0, "w", 0, (100, 100), 0.5)
    for other in (dare_keep_mask(1, 0, "w", 0, (100, 100), 0.5), dare_keep_mask(0, 1, "w", 0, (100, 100), 0.5),
                  dare_keep_mask(0, 0, "v", 0, (100, 100), 0.5)):
        agree = float((a == other).float().mean())
        assert 0.4 < agree < 0.6  # independent streams agree on about half the entries
    assert torch.equal(a, dare_keep_mask(0, 0, "w", 0, (100, 100), 0.5))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 17),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    p=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**31),
    expert=st.integers(0, 5),
)
def test_dare_mask_of_row_slices_concatenates_to_whole(rows, cols, cuts, p, seed, expert):
    name = "model.layers.3.self_attn.q_proj.weight"
    whole = dare_keep_mask(seed, expert, name, 0, (rows, cols), p)
    edges = [0, *sorted({min(c, rows) for c in cuts}), rows]
    parts = [dare_keep_mask(seed, expert, name, a * cols, (b - a, cols), p) for a, b in zip(edges, edges[1:])]
    assert torch.equal(torch.cat(parts), whole)


def test_dare_mask_large_offsets_stay_distinct():
    """Element indices past 2**32 use the high word: the stream does not wrap around."""
    lo = dare_keep_mask(0, 0, "w", 0, (4096,), 0.5)
    hi = dare_keep_mask(0, 0, "w", 2**32, (4096,), 0.5)
    assert not torch.equal(lo, hi)
    assert np.isclose(float(hi.float().mean()), 0.5, atol=0.05)


def test_streams_finished_early_drop_their_counts_and_stay_exact():
    """finish_stream as soon as a stream's tiles are in (what the merge pass does per tensor) frees its counts."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(5000, generator=g), torch.rand(3000, generator=g) * 7
    sel = StreamingSelector([KthQuery("a", 4000), KthQuery("b", 17), KthQuery("b", 2999)])
    while not sel.done:
        sel.add_values("a", a[:2500])
        sel.add_values("a", a[2500:])
        sel.finish_stream("a")
        assert all(key[0] != "a" for key in sel.counts)
        sel.add_values("b", b)
        sel.finish_pass()
    want = [torch.kthvalue(a, 4000).values.item(), torch.kthvalue(b, 17).values.item(),
            torch.kthvalue(b, 2999).values.item()]
    assert [q.value for q in sel.queries] == want


def test_sample_bracket_holds_the_answer_and_opens_at_the_ends():
    g = torch.Generator().manual_seed(11)
    v = torch.rand(400_000, generator=g)
    sample = torch.sort(v[::40]).values  # 10000 values
    for k in (5, 40_000, 200_000, 320_000, 399_990):
        lo, hi = sample_bracket(sample, k, v.numel())
        assert lo <= torch.kthvalue(v, k).values.item() <= hi, k
    assert sample_bracket(sample, 1, v.numel())[0] == 0.0  # the sample may have missed the minimum
    assert sample_bracket(sample, v.numel(), v.numel())[1] == math.inf
    lo, hi = sample_bracket(sample, 200_000, v.numel())
    assert hi - lo < 0.05  # 4 sd of the median's rank in 10000 values: ~0.04 of the range
