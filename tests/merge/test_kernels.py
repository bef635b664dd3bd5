"""The fused CPU kernels against their definition: the methods' torch functions, selection's histograms and
torch.kthvalue. Every comparison is bitwise (torch.equal / ==): a kernel is only allowed to be faster.

The kernels take flat numpy arrays of the stored bits; the helpers below hand them CPU tensors' bits."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")

from mergescale.merge import kernels  # noqa: E402
from mergescale.merge.kernels import merging, primitives, ties  # noqa: E402
from mergescale.merge.kernels import selection as kernel_selection  # noqa: E402
from mergescale.merge.methods import METHODS, UnitContext, get_method  # noqa: E402
from mergescale.merge.selection import RADIX, sample_bracket, window_around, window_histogram  # noqa: E402

SELECT_MERGE = [n for n, m in METHODS.items() if m.kernel is not None and m.kernel.merge == "ties"]
COUNTED = [n for n, m in METHODS.items() if m.kernel is not None and m.kernel.magnitudes]


def bits(t: torch.Tensor) -> np.ndarray | None:
    """A CPU tensor's values as the kernels read and write them (flat; bf16 as its uint16 bits), or None."""
    t = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy() if t.dtype == torch.float32 else None


def arrays(tiles: list[torch.Tensor]) -> tuple | None:
    """bits() of tiles of one dtype the kernels read, else None."""
    if len({t.dtype for t in tiles}) != 1 or bits(tiles[0]) is None:
        return None
    return tuple(bits(t) for t in tiles)


def merge_tile(method: str, p, weights, ctx, base, experts, out: torch.Tensor) -> bool:
    models, dst = arrays(([base] if base is not None else []) + list(experts)), bits(out)
    return models is not None and dst is not None and kernels.merge(get_method(method), p, weights, ctx, models,
                                                                     base is not None, dst)


def select_and_merge(method: str, p, ctx, base, experts, out: torch.Tensor, ks):
    models, dst = arrays([base] + list(experts)), bits(out)
    if models is None or dst is None:
        return None
    return kernels.select_and_merge(get_method(method), p, ctx, models, dst, ks)


def histograms(method: str, p, ctx, base, experts, windows):
    models = arrays([base] + list(experts))
    got = None if models is None else kernels.histograms(get_method(method), p, ctx, models, windows)
    return None if got is None else [[(below, torch.from_numpy(hist)) for below, hist in per] for per in got]


def dare_args(method: str, p, ctx, n_experts: int):
    return primitives.dare_args(get_method(method).kernel.dare(p), ctx.seed, ctx.name, n_experts, ctx.element_offset)

CASES = [
    ("average", {}), ("average", {"normalize": False}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("dare_linear", {"p": 0.9}), ("dare_linear", {"p": 0.3, "lambda": 1.3}), ("dare_linear", {"p": 0.0}),
    ("ties", {"density": 0.2}), ("ties", {"density": 0.2, "sign": "count", "lambda": 0.9}), ("ties", {"density": 1.0}),
    ("dare_ties", {}), ("dare_ties", {"p": 0.5, "density": 0.3, "sign": "count"}),
]


def models(n: int, dtype: torch.dtype, n_experts: int = 4, seed: int = 0):
    """A base and experts with the awkward cases in them: tau exactly 0, +-0 bases, sign cancellations, scales."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    base[:7] = 0.0
    base[7:11] = -0.0
    experts = []
    for i in range(n_experts):
        e = base + 0.01 * (i + 1) * torch.randn(n, generator=g)
        e[: 20 + 5 * i] = base[: 20 + 5 * i]  # zero task vectors
        experts.append(e)
    if n_experts > 1:
        experts[1][40:60] = 2 * base[40:60] - experts[0][40:60]  # tau_1 = -tau_0: cancels under "mass"
    return base.to(dtype), [e.to(dtype) for e in experts]


def context(n: int, n_experts: int, offset: int = 12345, with_thresholds: bool = True) -> UnitContext:
    thr = [{"min": x} for x in (0.005, 0.01, 0.0, 0.02, 0.007, 0.0)[:n_experts]] if with_thresholds else []
    return UnitContext(name="model.layers.0.mlp.up_proj.weight", shape=(n,), element_offset=offset, seed=7,
                       thresholds=thr)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method, params", CASES)
def test_merge_kernel_equals_torch_definition(method, params, in_dtype, out_dtype):
    n = 20_011  # not a multiple of any block size: partial sub-blocks at the end
    base, experts = models(n, in_dtype)
    m = get_method(method)
    p = m.params.model_validate(params)
    weights = [0.3, 1.0, 0.7, 2.0]
    ctx = context(n, len(experts))
    out = torch.empty(n, dtype=out_dtype)
    assert merge_tile(method, p, weights, ctx, base, experts, out)
    want = m.merge(base.float(), [e.float() for e in experts], weights, p, ctx).to(out_dtype)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))  # bits, so -0.0 vs 0.0 counts too


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), n_experts=st.integers(1, 5), offset=st.integers(0, 2**33), seed=st.integers(0, 10**6),
       case=st.sampled_from(CASES))
def test_merge_kernel_equals_definition_any_shape(n, n_experts, offset, seed, case):
    method, params = case
    base, experts = models(n, torch.bfloat16, n_experts, seed)
    m = get_method(method)
    p = m.params.model_validate(params)
    weights = [0.5 + i for i in range(n_experts)]
    ctx = context(n, n_experts, offset)
    out = torch.empty(n, dtype=torch.bfloat16)
    assert merge_tile(method, p, weights, ctx, base, experts, out)
    want = m.merge(base.float(), [e.float() for e in experts], weights, p, ctx).to(torch.bfloat16)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


def test_one_compiled_kernel_serves_every_expert_count():
    """numba compiles per argument type and a tuple's length is part of it: experts go in padded to EXPERT_SLOTS,
    so 1 to 8 experts share one compiled kernel (a fresh node compiles once for the study's 2/4/6/8 grid), 9 to 16
    the next one; every count still merges exactly as the definition."""
    names = ("_average_kernel", "_linear_kernel", "_ties_kernel")
    compiled = []
    for n_experts in (1, 2, 3, 5, 8, 9, 12):
        base, experts = models(700, torch.float32, n_experts, seed=n_experts)
        ctx = UnitContext(name="t", shape=(700,), element_offset=3, seed=7,
                          thresholds=[{"min": 0.004 * (i % 3)} for i in range(n_experts)])
        weights = [0.5 + i for i in range(n_experts)]
        for method, params in (("average", {}), ("dare_linear", {"p": 0.3}), ("ties", {"density": 0.2})):
            m = get_method(method)
            p = m.params.model_validate(params)
            out = torch.empty(700)
            assert merge_tile(method, p, weights, ctx, base, experts, out)
            want = m.merge(base, experts, weights, p, ctx)
            assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (method, n_experts)
        compiled.append({k: len(getattr(ties if k == "_ties_kernel" else merging, k).signatures) for k in names})
    assert compiled[0] == compiled[4], compiled  # 1..8 experts: nothing compiled after the first
    assert compiled[5] == compiled[6], compiled  # 9 and 12: one more


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 3000), distinct=st.sampled_from([2, 7, 1 << 30]))
def test_select_finds_the_kth_smallest_and_partitions_around_it(data, n, distinct):
    """kernel_selection.select_kth (the quickselect behind the sampled brackets and the exact thresholds) against a
    sort, with many equal values or none."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = (rng.integers(0, distinct, n) * 0.25).astype(np.float32)
    k = data.draw(st.integers(0, n - 1))
    got = a.copy()
    v = kernel_selection.select_kth(got, k)
    assert v == np.sort(a)[k]
    assert got[k] == v and (got[:k] <= v).all() and (got[k + 1:] >= v).all()
    assert np.array_equal(np.sort(got), np.sort(a))  # reordered, nothing lost


@pytest.mark.parametrize("values", ["repeating", "distinct", "one bin", "extremes", "small"])
def test_order_stats_equal_a_sort(values):
    """order_stats (the sampled brackets' two order statistics per expert: counts per top 16 bits, then a select
    within a bin) against np.sort: bf16-like magnitudes that repeat, all-distinct ones, values that all share
    their top 16 bits (the select does all the work), zeros next to the largest finite float, and a small sample.
    Positions in one bin and in two, at the ends, and -1 (left as is)."""
    rng = np.random.default_rng(7)
    n = 100 if values == "small" else 2**15 + 1234
    if values == "repeating":
        s = (rng.integers(0, 300, (4, n)) * 2.0**-12).astype(np.float32)
    elif values == "distinct":
        s = np.abs(rng.standard_normal((4, n))).astype(np.float32)
    elif values == "one bin":  # 1.0 + a few ulps: one top-16-bit bin, 4096 distinct values
        s = (np.float32(1.0).view(np.int32) + rng.integers(0, 4096, (4, n))).astype(np.int32).view(np.float32)
    else:
        s = np.abs(rng.standard_normal((4, n))).astype(np.float32)
        s[:, ::3] = 0.0
        s[:, 1::7] = np.finfo(np.float32).max
    pairs = [(3, 9), (n // 2, n // 2 + 1), (n - n // 5 - n // 10, n - n // 5 + n // 10), (0, n - 1)]
    srt = np.sort(s, axis=1)
    lo, hi = np.full(4, -7.0, np.float32), np.full(4, -7.0, np.float32)
    sample = s.copy()
    kernel_selection.order_stats(sample, np.array([a for a, _ in pairs]), np.array([b for _, b in pairs]), lo, hi)
    assert np.array_equal(sample, s)  # not reordered
    for j, (a, b) in enumerate(pairs):
        assert (lo[j], hi[j]) == (srt[j, a], srt[j, b]), (values, j)
    before = lo.copy(), hi.copy()
    kernel_selection.order_stats(s.copy(), np.array([-1, 5, -1, 7]), np.array([10, -1, -1, 9]), lo, hi)
    assert (lo[0], hi[0]) == (before[0][0], srt[0, 10])
    assert (lo[1], hi[1]) == (srt[1, 5], before[1][1])
    assert (lo[2], hi[2]) == (before[0][2], before[1][2])
    assert (lo[3], hi[3]) == (srt[3, 7], srt[3, 9])


@pytest.mark.parametrize("method, params", [("ties", {}), ("dare_ties", {"density": 0.5}), ("breadcrumbs", {})])
def test_histogram_kernels_equal_selection_histograms(method, params):
    n = 30_001
    base, experts = models(n, torch.bfloat16)
    m = get_method(method)
    p = m.params.model_validate(params)
    ctx = context(n, len(experts), with_thresholds=False)
    mags = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    windows = []
    for x in mags:  # the radix windows, a sampled one (wide bins) and a narrow one at the median
        med = torch.median(x).item()
        hi = window_histogram(x, RADIX)[1]
        windows.append([[RADIX], [RADIX.refine(int(torch.argmax(hi))), window_around(med * 0.5, med * 2)],
                        [window_around(med, med * 1.001)]])
    for q in range(3):
        ws = [w[q] for w in windows]
        got = histograms(method, p, ctx, base, experts, ws)
        for j, x in enumerate(mags):
            for w, (below, hist) in zip(ws[j], got[j]):
                want_below, want_hist = window_histogram(x, w)
                assert below == want_below and torch.equal(hist, want_hist), (j, w)


@pytest.mark.parametrize("n_experts", [3, 4])
def test_histogram_kernel_with_a_window_per_expert_and_one_without(n_experts):
    """One sampled window per expert, no DARE, 3 or 4 experts (the one-loop _hist4), an expert whose selection is
    done (no window) in between: its counts are not asked for, the others' equal the selection's histograms."""
    n = 30_001
    base, experts = models(n, torch.bfloat16, n_experts, seed=11)
    m = get_method("ties")
    p = m.params.model_validate({})
    ctx = context(n, n_experts, with_thresholds=False)
    mags = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    ws = [[window_around(torch.quantile(x, 0.78).item(), torch.quantile(x, 0.82).item())] for x in mags]
    ws[1] = []
    got = histograms("ties", p, ctx, base, experts, ws)
    assert got[1] == []
    for j, x in enumerate(mags):
        for w, (below, hist) in zip(ws[j], got[j]):
            want_below, want_hist = window_histogram(x, w)
            assert below == want_below and torch.equal(hist, want_hist), j


def _select_merge_case(method, params, in_dtype, offset=12345):
    n = 8 * kernel_selection.SAMPLE_RUNS * kernel_selection.SAMPLE_RUN + 999
    base, experts = models(n, in_dtype)
    experts[2][::7] += 0.5  # a second population of magnitudes the sample has to straddle
    m = get_method(method)
    p = m.params.model_validate(params)
    ctx = context(n, len(experts), offset=offset, with_thresholds=False)
    return n, base, experts, m, p, ctx


@pytest.mark.parametrize("in_dtype, out_dtype, offset", [(torch.bfloat16, torch.bfloat16, 12345),
                                                         (torch.float32, torch.bfloat16, 2**32 - 1000),
                                                         (torch.bfloat16, torch.float32, 3)])
@pytest.mark.parametrize("method, params", [("ties", {}), ("ties", {"sign": "count"}), ("dare_ties", {"density": 0.3})])
def test_select_and_merge_equals_kthvalue_then_merge(method, params, in_dtype, out_dtype, offset):
    """One pass (bracketed merge + redo of the listed elements) == thresholds by torch.kthvalue, then methods.py."""
    n, base, experts, m, p, ctx = _select_merge_case(method, params, in_dtype, offset)
    mags = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    for k in (1, 2, n // 10, n // 2, n - n // 5, n - 3, n):
        out = torch.empty(n, dtype=out_dtype)
        got = select_and_merge(method, p, ctx, base, experts, out, [k] * 4)
        want_thr = [torch.kthvalue(x, k).values.item() for x in mags]
        assert got == want_thr, k
        ref_ctx = UnitContext(name=ctx.name, shape=ctx.shape, element_offset=offset, seed=ctx.seed,
                              thresholds=[{"min": v} for v in want_thr])
        want = m.merge(base.float(), [e.float() for e in experts], [1.0] * 4, p, ref_ctx).to(out_dtype)
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), k


@pytest.mark.parametrize("method, params, in_dtype",
                         [("ties", {}, torch.bfloat16), ("dare_ties", {"p": 0.5}, torch.float32)])
def test_magnitudes_equal_the_methods_magnitudes(method, params, in_dtype):
    """The torch-free magnitudes (samples, small tensors' thresholds): bitwise the torch definition's."""
    n = 5000
    base, experts = models(n, in_dtype)
    m = get_method(method)
    p = m.params.model_validate(params)
    ctx = context(n, len(experts), offset=777, with_thresholds=False)
    got = kernels.magnitudes(m, p, ctx, arrays([base] + experts))
    want = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    for j, x in enumerate(want):
        assert np.array_equal(got[j].view(np.int32), x.reshape(-1).numpy().view(np.int32)), j
    experts[1][3] = float("nan")
    assert kernels.magnitudes(m, p, ctx, arrays([base] + experts)) is None


@pytest.mark.parametrize("n", [3000, 20_000, 200_000])  # fewer runs than the cap, and capped at SAMPLE_MAX
def test_sampled_bracket_equals_sample_bracket_on_the_sorted_sample(monkeypatch, n):
    monkeypatch.setattr(kernel_selection, "SAMPLE_RUNS", 4)
    monkeypatch.setattr(kernel_selection, "SAMPLE_RUN", 16)
    monkeypatch.setattr(kernel_selection, "SAMPLE_MAX", 2**12)
    base, experts = models(n, torch.float32)
    ks = [1, n // 3, n - n // 5, n]
    raw = arrays([base] + experts)
    lo, hi, share = kernel_selection.sample_bracket(raw[0], raw[1:], primitives.dare_args(0.0, 0, "t", 4, 0), ks)
    runs = min(2**12 // 16, n // (8 * 16))
    step = (n - 16) // (runs - 1)
    pos = torch.cat([torch.arange(s * step, s * step + 16) for s in range(runs)])
    inside = torch.zeros(len(pos), dtype=torch.bool)
    for j, (e, k) in enumerate(zip(experts, ks)):
        sample = (e - base).abs()[pos]
        want = sample_bracket(np.sort(sample.numpy()), k, n)
        assert (float(lo[j]), float(hi[j])) == want, j
        if want[0] != want[1]:  # a bracket of one value lists nothing
            inside |= (sample >= want[0]) & (sample <= want[1])
    assert share == pytest.approx(inside.float().mean().item())


MIXED = (0.002, 0.002, 0.004, 0.3)


def _quantized_case(n: int = 600_000, spreads: tuple = MIXED):
    """bf16 experts 0.002 away from a N(0, 1) base: |tau| takes a handful of values (multiples of bf16 ulps), so a
    sampled bracket is often one value (lo = hi), which the kernel counts instead of listing; in MIXED, expert 3 is
    spread out (continuous magnitudes, a real bracket), so one call runs both branches."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    experts = [base + s * torch.randn(n, generator=g) for s in spreads]
    return base.to(torch.bfloat16), [e.to(torch.bfloat16) for e in experts]


@pytest.mark.parametrize("method, params", [("ties", {}), ("ties", {"sign": "count", "density": 0.35}),
                                            ("dare_ties", {"p": 0.3, "density": 0.2})])
def test_select_and_merge_with_brackets_of_one_value(method, params):
    n = 600_000
    base, experts = _quantized_case(n)
    m = get_method(method)
    p = m.params.model_validate(params)
    ctx = UnitContext(name="lm_head.weight", shape=(n,), element_offset=77, seed=5, thresholds=[])
    mags = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    k = n - int(p.density * n)
    raw = arrays([base] + experts)
    lo, hi, _ = kernel_selection.sample_bracket(raw[0], raw[1:], dare_args(method, p, ctx, 4), [k] * 4)
    assert (lo == hi).any() and (lo != hi).any()  # both kinds of bracket in this call
    out = torch.empty(n, dtype=torch.bfloat16)
    got = select_and_merge(method, p, ctx, base, experts, out, [k] * 4)
    want_thr = [torch.kthvalue(x, k).values.item() for x in mags]
    assert got == want_thr
    ref_ctx = UnitContext(name=ctx.name, shape=ctx.shape, element_offset=77, seed=5,
                          thresholds=[{"min": v} for v in want_thr])
    want = m.merge(base.float(), [e.float() for e in experts], [1.0] * 4, p, ref_ctx).to(torch.bfloat16)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("n_experts", [3, 4])
@pytest.mark.parametrize("sign", ["mass", "count"])
def test_select_and_merge_with_every_bracket_of_one_value(n_experts, sign):
    """Every bracket one value, no DARE, 3 or 4 experts: the one-loop merge (_ties4) counts them in registers."""
    n = 600_000
    base, experts = _quantized_case(n, (0.002, 0.003, 0.004, 0.002)[:n_experts])
    m = get_method("ties")
    p = m.params.model_validate({"density": 0.35, "sign": sign})
    ctx = UnitContext(name="lm_head.weight", shape=(n,), element_offset=77, seed=5, thresholds=[])
    k = [n - int(p.density * n)] * n_experts
    raw = arrays([base] + experts)
    no_dare = primitives.dare_args(0.0, 5, ctx.name, n_experts, 77)
    lo, hi, _ = kernel_selection.sample_bracket(raw[0], raw[1:], no_dare, k)
    assert (lo == hi).all()
    out = torch.empty(n, dtype=torch.bfloat16)
    got = select_and_merge("ties", p, ctx, base, experts, out, k)
    mags = m.magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    want_thr = [torch.kthvalue(x, k[0]).values.item() for x in mags]
    assert got == want_thr
    ref_ctx = UnitContext(name=ctx.name, shape=ctx.shape, element_offset=77, seed=5,
                          thresholds=[{"min": v} for v in want_thr])
    want = m.merge(base.float(), [e.float() for e in experts], [1.0] * n_experts, p, ref_ctx).to(torch.bfloat16)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("spreads, density", [(MIXED, 0.2), ((0.002, 0.003, 0.004), 0.35)])  # the second: _ties4
def test_a_wrong_bracket_of_one_value_is_caught_by_the_counts(monkeypatch, spreads, density):
    n = 600_000
    base, experts = _quantized_case(n, spreads)
    p = get_method("ties").params.model_validate({"density": density})
    ctx = UnitContext(name="t", shape=(n,), element_offset=0, seed=0, thresholds=[])
    k = [n - int(density * n)] * len(experts)
    real = kernel_selection.sample_bracket

    def shifted(*a):  # one-value brackets at the next magnitude up: the right kind, the wrong value
        lo, hi, share = real(*a)
        one = lo == hi
        assert one.any()
        lo, hi = lo.copy(), hi.copy()
        lo[one] = hi[one] = np.nextafter(lo[one], np.float32(np.inf))
        return lo, hi, share

    out = torch.empty(n, dtype=torch.bfloat16)
    assert select_and_merge("ties", p, ctx, base, experts, out, k) is not None
    monkeypatch.setattr(kernel_selection, "sample_bracket", shifted)
    assert select_and_merge("ties", p, ctx, base, experts, out, k) is None


def test_select_and_merge_declines_when_the_bracket_misses_or_overflows(monkeypatch):
    n, base, experts, m, p, ctx = _select_merge_case("ties", {}, torch.bfloat16)
    out = torch.empty(n, dtype=torch.bfloat16)
    k = [n - n // 5] * 4
    assert select_and_merge("ties", p, ctx, base, experts, out, k) is not None
    monkeypatch.setattr(ties, "REDO_SLACK", 0.0)  # list buffers too small for the elements to redo
    assert select_and_merge("ties", p, ctx, base, experts, out, k) is None
    monkeypatch.undo()
    # a bracket entirely below the answer: the counts show it, nothing is guessed
    def bracket_below(*a):
        return np.zeros(4, np.float32), np.full(4, 1e-6, np.float32), 0.1

    monkeypatch.setattr(kernel_selection, "sample_bracket", bracket_below)
    assert select_and_merge("ties", p, ctx, base, experts, out, k) is None


def test_non_finite_task_vectors_are_left_to_the_definition():
    n = 5000
    base, experts = models(n, torch.float32)
    experts[1][123] = float("inf")
    p = get_method("ties").params.model_validate({})
    ctx = context(n, len(experts))
    assert not merge_tile("ties", p, [1.0] * 4, ctx, base, experts, torch.empty(n))
    assert histograms("ties", p, ctx, base, experts, [[RADIX]] * 4) is None
    experts[1][123] = float("nan")
    assert not merge_tile("task_arithmetic", get_method("task_arithmetic").params.model_validate({}),
                                  [1.0] * 4, ctx, base, experts, torch.empty(n))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["base", "expert"])
def test_every_kernel_declines_any_non_finite_input(dtype, value, where):
    """The pipeline skips its own NaN/inf scan wherever a kernel succeeded, so a kernel must decline a unit with a
    single non-finite value anywhere, whether or not that element is trimmed, dropped or sampled."""
    n, base, experts, _, _, ctx = _select_merge_case("ties", {}, dtype)
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype} {value} {where}".encode()))  # same positions every run
    for trial in range(3):
        b, es = base.clone(), [e.clone() for e in experts]
        i = int(torch.randint(n, (1,), generator=g))
        if where == "base":
            b[i] = value
        else:
            es[trial][i] = value
        for method, params in CASES:
            p = get_method(method).params.model_validate(params)
            out = torch.empty(n, dtype=dtype)
            assert not merge_tile(method, p, [1.0] * 4, ctx, b, es, out), (method, params, i)
            if method in SELECT_MERGE:
                assert select_and_merge(method, p, ctx, b, es, out, [n - n // 5] * 4) is None
            if method in COUNTED:
                assert histograms(method, p, ctx, b, es, [[RADIX]] * 4) is None


def test_unsupported_inputs_are_declined():
    n = 100
    base, experts = models(n, torch.float16)
    p = get_method("ties").params.model_validate({})
    ctx = context(n, len(experts))
    assert not merge_tile("ties", p, [1.0] * 4, ctx, base, experts, torch.empty(n))  # float16 tiles
    base, experts = models(n, torch.float32)
    assert not merge_tile("ties", p, [1.0] * 4, ctx, base, experts, torch.empty(n, dtype=torch.float16))
    assert not merge_tile("slerp", p, [1.0] * 4, ctx, base, experts, torch.empty(n))  # no kernel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_count_nonfinite(dtype):
    t = torch.randn(10_000).to(dtype)
    assert kernels.count_nonfinite(bits(t)) == 0
    t[[5, 77, 9000]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    assert kernels.count_nonfinite(bits(t)) == int((~torch.isfinite(t)).sum()) == 3


def test_histograms_with_fewer_private_copies_than_threads(monkeypatch):
    """On many-core nodes the histogram kernels cap their private copies (HIST_ITEMS); counts must not change."""
    n = 30_001
    base, experts = models(n, torch.bfloat16)
    p = get_method("ties").params.model_validate({})
    ctx = context(n, len(experts), with_thresholds=False)
    mags = get_method("ties").magnitudes(base.float(), [e.float() for e in experts], p, ctx)
    ws = [[RADIX, window_around(torch.median(x).item(), 1.0)] for x in mags]
    monkeypatch.setattr(kernel_selection, "HIST_ITEMS", 1)
    got = histograms("ties", p, ctx, base, experts, ws)
    for j, x in enumerate(mags):
        for w, (below, hist) in zip(ws[j], got[j]):
            want_below, want_hist = window_histogram(x, w)
            assert below == want_below and torch.equal(hist, want_hist)


def test_kernels_from_several_threads_at_once():
    """The kernels run on numba's workqueue layer, which must not be entered by two threads at once: the
    dispatch serializes launches, so concurrent callers (e.g. two merges in one process) get correct results."""
    from concurrent.futures import ThreadPoolExecutor

    import numba

    n = 50_000
    base, experts = models(n, torch.bfloat16)
    p = get_method("ties").params.model_validate({})
    ctx = context(n, len(experts))
    want = get_method("ties").merge(base.float(), [e.float() for e in experts], [1.0] * 4, p, ctx).to(torch.bfloat16)

    def one(_):
        out = torch.empty(n, dtype=torch.bfloat16)
        assert merge_tile("ties", p, [1.0] * 4, ctx, base, experts, out)
        return out

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(one, range(16)))
    assert all(torch.equal(o.view(torch.uint8), want.view(torch.uint8)) for o in outs)
    if "NUMBA_THREADING_LAYER" not in os.environ:  # the layer whose threads sleep between kernels
        assert numba.threading_layer() == "workqueue"
