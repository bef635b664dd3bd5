"""The fast implementations on the merge hot path give exactly the bits of their plain definitions.

- the torch DARE hash (int32 wrap-around arithmetic, chunked) vs the numpy `uniform_bits_reference`;
- the float-only TIES update vs trim / elect_sign / disjoint_mean, on vectors full of edge cases;
- the pipeline's chunked math and radix-select thresholds vs whole-unit math (tiny chunks).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescale.merge import torch_math as M
from mergescale.merge.masks import dare_keep_mask, uniform_bits, uniform_bits_reference


@pytest.mark.parametrize("seed, expert, name, start, count", [
    (0, 0, "a", 0, 1),
    (0, 0, "a", 0, 100_003),
    (3, 2, "model.layers.0.mlp.up_proj.weight", 123_456_789, 70_001),
    (1, 1, "x", 2**31 - 100, 300),              # lo32 crosses the int32 sign boundary
    (1, 1, "x", 2**32 - 5_000, 70_000),          # crosses 2**32: hi32 changes inside a chunk
    (5, 3, "y", 2**33 + 7, 65_536 * 2 + 3),
])
def test_torch_hash_matches_reference(seed, expert, name, start, count):
    ref = uniform_bits_reference(seed, expert, name, start, count)
    got = uniform_bits(seed, expert, name, start, count)
    assert got.dtype == np.uint32 and np.array_equal(ref, got)
    for p in (0.1, 0.5, 0.9, 1 - 1e-12):
        thr = np.uint32(min(int(round(p * 2**32)), 2**32 - 1))
        keep = dare_keep_mask(seed, expert, name, start, (count,), p)
        assert keep.dtype == torch.bool and np.array_equal(keep.numpy(), ref >= thr), p


def _reference_update(taus, thresholds, mode):
    trimmed = [M.trim(t, thr) for t, thr in zip(taus, thresholds)]
    return M.disjoint_mean(trimmed, M.elect_sign(trimmed, mode))


def _edge_vectors(g, n, k):
    out = []
    for _ in range(k):
        t = torch.randn(n, generator=g) * 10 ** float(torch.randint(-40, 3, (1,), generator=g))
        r = torch.rand(n, generator=g)
        for lo, hi, v in ((0.0, 0.1, 0.0), (0.1, 0.15, -0.0), (0.15, 0.2, 0.5), (0.2, 0.25, -0.5),
                          (0.25, 0.27, 1e-45), (0.27, 0.28, -1e-45), (0.28, 0.29, 3e30)):
            t[(r >= lo) & (r < hi)] = v
        out.append(t)
    return out


@pytest.mark.parametrize("mode", ["mass", "count"])
def test_fast_ties_update_is_bitwise_the_definition(mode):
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 3000, (1,), generator=g))
        k = int(torch.randint(1, 6, (1,), generator=g))
        taus = _edge_vectors(g, n, k)
        thresholds = [0.5] * k if trial % 5 == 0 else [
            0.0 if torch.rand(1, generator=g) < 0.3 else float(t.abs().kthvalue(max(1, n // 2)).values) for t in taus]
        want = _reference_update([t.clone() for t in taus], thresholds, mode)
        got = M._ties_update_fast([t.clone() for t in taus], thresholds, mode)
        assert got is not None
        assert torch.equal(want.view(torch.int32), got.view(torch.int32)), trial


def test_fast_ties_update_defers_on_non_finite():
    t = torch.tensor([float("nan"), 1.0, float("inf"), -2.0])
    assert M._ties_update_fast([t, -t], [0.0, 0.0], "mass") is None
    assert torch.equal(M.ties_update([t.clone(), -t], [0.0, 0.0], "count").isnan(),
                       _reference_update([t.clone(), -t], [0.0, 0.0], "count").isnan())


@pytest.mark.parametrize("variant", ["ties_tensor_mass", "dare_ties_trim_tensor", "slerp", "model_stock",
                                     "dare_linear"])
def test_tiny_chunks_and_radix_thresholds_change_nothing(micro, tmp_path, monkeypatch, variant):
    """Chunks of 5 elements and the radix-select path for every per-tensor threshold give the same bytes."""
    from mergescale.merge import pipeline
    from tests.helpers import merge
    from tests.merge.test_methods import variant_config

    cfg = variant_config(micro, variant)
    whole = merge(cfg, tmp_path / "whole")
    monkeypatch.setattr(pipeline, "CHUNK_ELEMS", 5)
    monkeypatch.setattr(pipeline, "KTHVALUE_MAX", 1)
    chunked = merge(cfg, tmp_path / "chunked")
    assert chunked["outputs"] == whole["outputs"]


@pytest.mark.parametrize("variant", ["ties_tensor_mass", "dare_ties_trim_tensor"])
def test_one_pass_select_and_merge_changes_nothing(micro, tmp_path, monkeypatch, variant):
    """Per-tensor TIES through the fused select-and-merge kernel (sampled brackets, listed elements redone) gives
    the bytes of selecting first (radix select) and merging after."""
    from mergescale.merge import kernels, pipeline
    from mergescale.merge.kernels import selection as kernel_selection
    from tests.helpers import merge
    from tests.merge.test_methods import variant_config

    if not kernels.available():
        pytest.skip("numba not installed")
    cfg = variant_config(micro, variant)
    monkeypatch.setattr(pipeline, "KTHVALUE_MAX", 1)
    monkeypatch.setattr(kernels, "select_and_merge", lambda *a, **k: None)
    separate = merge(cfg, tmp_path / "separate")
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "KTHVALUE_MAX", 1)
    monkeypatch.setattr(kernel_selection, "SAMPLE_RUNS", 8)  # sample 8 x 16 values: the micro model's tensors qualify
    monkeypatch.setattr(kernel_selection, "SAMPLE_RUN", 16)
    calls = []
    real = kernels.select_and_merge

    def counted(*a, **k):
        calls.append(real(*a, **k))
        return calls[-1]

    monkeypatch.setattr(kernels, "select_and_merge", counted)
    fused = merge(cfg, tmp_path / "fused")
    assert sum(c is not None for c in calls) >= 2  # the fused path really ran (a miss may fall back)
    assert fused["outputs"] == separate["outputs"]
