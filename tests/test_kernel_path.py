"""merge/kernel_path.py: the merge pass with the fused kernels alone (thresholds included), on mapped rows as numpy
arrays. Its tiles must be the single-process executor's bytes, and every unit it cannot merge must go to the
fallback (never a silently different result)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergescale.config import MergeConfig
from mergescale.merge import kernel_path
from mergescale.merge.executor import run_merge
from mergescale.merge.inputs import open_inputs, plan_merge
from mergescale.merge.reader import UnitReader
from tests.conftest import load_sd, write_like

pytestmark = pytest.mark.skipif(not kernel_path.kernels.available(), reason="needs numba")

CASES = [
    ("average", {"normalize": True}, [1.0, 3.0]),
    ("task_arithmetic", {"lambda": 0.7}, [1.0, 0.5]),
    ("dare_linear", {"p": 0.4, "lambda": 0.8}, [1.0, 1.0]),
    ("dare_ties", {"p": 0.6, "lambda": 0.9, "sign": "count"}, [1.0, 1.0]),  # density 1: no statistics
]


def kernel_pass(cfg: dict, fallback=None) -> tuple[dict[str, np.ndarray], list[tuple[str, int]]]:
    """Run kernel_path.merge_stream over every unit; returns each tensor reassembled from its tiles (flat), and the
    (name, first row) of the units that went to the fallback."""
    config = MergeConfig.model_validate(cfg)
    inputs = open_inputs(config)
    plan = plan_merge(config, inputs)
    tiles, fell_back, warnings = {}, [], []

    def write(unit, tile):
        tiles[(unit.name, unit.row_start)] = tile.copy() if isinstance(tile, np.ndarray) else tile

    def fb(unit):
        fell_back.append((unit.name, unit.row_start))
        return fallback(unit, inputs, plan, config)

    reader = UnitReader(inputs, config.on_nonfinite, raw=True)
    try:
        assert list(kernel_path.merge_stream(config, plan, inputs, reader, plan.units, warnings, write, fb)) == plan.units
    finally:
        reader.close()
        inputs.close()
    out = {}
    for name, info in inputs.all[0].tensors.items():
        parts = [tiles[k] for k in sorted(k for k in tiles if k[0] == name)]
        out[name] = np.concatenate([p.reshape(-1) for p in parts])
    return out, fell_back


def as_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().reshape(-1).view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()


@pytest.mark.parametrize("fam_name", ["family", "bf16"])
@pytest.mark.parametrize("method,params,weights", CASES)
@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_kernel_path_bytes_equal_the_executor(request, tmp_path, fam_name, method, params, weights, out_dtype):
    """Every method, stored dtype (float32, bf16), output dtype and a tile size that splits tensors into row
    slices: the kernel pass's tiles reassemble into exactly the single-process output's bits."""
    fam = request.getfixturevalue(fam_name)
    cfg = {"base": str(fam.base), "experts": [{"path": p, "weight": w} for p, w in zip(fam.expert_strs[:2], weights)],
           "method": method, "parameters": params, "tile_mb": 0.004, "seed": 11, "out_dtype": out_dtype}
    got, fell_back = kernel_pass(cfg)
    assert fell_back == []
    run_merge(cfg, tmp_path / "single", progress=False)
    want = load_sd(tmp_path / "single")
    assert sorted(got) == sorted(want)
    split = 0
    for name, t in want.items():
        assert got[name].dtype.itemsize == t.element_size(), name
        assert np.array_equal(got[name].view(as_bits(t).dtype), as_bits(t)), name
        split += t.numel() * t.element_size() > 0.004 * 2**20
    assert split  # some tensors really were merged in row slices


def test_units_the_kernels_do_not_merge_go_to_the_fallback(family, tmp_path):
    """float16 inputs, a float16 output and a NaN: merge_unit_arrays says None and the fallback's tile is used."""
    name = "model.layers.0.mlp.down_proj.weight"
    sd = load_sd(family.experts[1])
    sd[name][1, 2] = float("nan")
    nan_expert = write_like(family.experts[1], tmp_path / "nan", sd)
    half = [write_like(p, tmp_path / f"half{i}", {k: v.half() for k, v in load_sd(p).items()})
            for i, p in enumerate([family.base, family.experts[0]])]

    def marker(unit, inputs, plan, config):  # a tile the kernels never produce: 7.0 in the output dtype
        rows, info = unit.row_end - unit.row_start, inputs.all[0].tensors[unit.name]
        return np.full(rows * info.row_numel, 7.0, {"F32": np.float32, "F16": np.float16}[plan.out_dtypes[unit.name]])

    base = {"method": "task_arithmetic", "parameters": {"lambda": 0.5}, "tile_mb": 0.004, "on_nonfinite": "warn"}
    got, fell = kernel_pass({**base, "base": str(family.base), "experts": [family.expert_strs[0], str(nan_expert)]}, marker)
    row_numel = load_sd(family.base)[name].shape[1]
    assert len(fell) == 1 and fell[0][0] == name and fell[0][1] <= 1  # only the row slice holding the NaN
    sevens = np.flatnonzero(got[name] == 7.0)
    assert sevens.size and sevens[0] == fell[0][1] * row_numel and 1 * row_numel + 2 in sevens

    _, fell = kernel_pass({**base, "base": str(half[0]), "experts": [str(half[1])]}, marker)
    assert {n for n, _ in fell} == set(load_sd(half[0]))
    _, fell = kernel_pass({**base, "base": str(family.base), "experts": [family.expert_strs[0]], "out_dtype": "float16"},
                          marker)
    assert {n for n, _ in fell} == set(load_sd(family.base))


@pytest.mark.parametrize("fam_name", ["family", "bf16"])
@pytest.mark.parametrize("params", [{"density": 0.3, "trim_scope": "tensor"},
                                    {"density": 0.6, "trim_scope": "tensor", "sign": "count", "lambda": 0.8}])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_kernel_path_finds_each_tensors_own_thresholds(request, tmp_path, fam_name, method, params):
    """Per-tensor TIES / DARE-TIES with every tensor in one unit: the kernel pass finds each tensor's thresholds
    itself (counting its magnitudes, no torch) and its tiles are the single-process output's bits."""
    fam = request.getfixturevalue(fam_name)
    cfg = {"base": str(fam.base), "experts": fam.expert_strs[:2], "method": method, "parameters": params,
           "tile_mb": 64, "seed": 5}
    got, fell_back = kernel_pass(cfg)
    assert fell_back == []
    run_merge(cfg, tmp_path / "single", progress=False)
    want = load_sd(tmp_path / "single")
    for name, t in want.items():
        assert np.array_equal(got[name].view(as_bits(t).dtype), as_bits(t)), name


def test_usable_with_mapped_safetensors_and_a_method_the_kernels_merge(family):
    def usable(**kw):
        config = MergeConfig.model_validate({"base": str(family.base), "experts": family.expert_strs[:2], **kw})
        inputs = open_inputs(config)
        try:
            return kernel_path.usable(config, inputs)
        finally:
            inputs.close()

    assert usable(method="average") and usable(method="dare_linear", parameters={"p": 0.2})
    assert usable(method="dare_ties") and usable(method="dare_ties", parameters={"density": 0.5})
    assert usable(method="ties") and not usable(method="slerp", parameters={"t": 0.5})
    assert not usable(method="breadcrumbs") and not usable(method="model_stock")
    assert not usable(method="average", read="pread")
