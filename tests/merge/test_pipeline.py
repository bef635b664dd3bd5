"""merge/pipeline.py: one unit from its rows to its merged rows. The fused kernels and the torch definitions are two
ways to the same bytes: a unit the kernels decline (a NaN, a dtype they do not read or write) takes the torch path,
never a different result, and a merge the kernels can do alone never loads torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mergescale.config import MergeConfig
from mergescale.merge import kernels, pipeline
from mergescale.merge.inputs import open_inputs, plan_merge
from mergescale.merge.methods import METHODS
from mergescale.merge.reader import read_rows
from tests.helpers import load_sd, merge, write_like

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs numba")

CASES = [
    ("average", {"normalize": True}, [1.0, 3.0]),
    ("task_arithmetic", {"lambda": 0.7}, [1.0, 0.5]),
    ("dare_linear", {"p": 0.4, "lambda": 0.8}, [1.0, 1.0]),
    ("ties", {"density": 0.3, "trim_scope": "tensor", "sign": "count"}, [1.0, 1.0]),
    ("dare_ties", {"p": 0.6, "lambda": 0.9, "density": 0.5, "trim_scope": "tensor"}, [1.0, 1.0]),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, [1.0, 2.0]),  # a magnitudes kernel only
]


def without_kernels(monkeypatch, method: str) -> None:
    monkeypatch.setitem(METHODS, method, dataclasses.replace(METHODS[method], kernel=None))


def config(fam, method, params, weights, **extra) -> dict:
    return {"base": str(fam.base), "experts": [{"path": p, "weight": w} for p, w in zip(fam.expert_strs[:2], weights)],
            "method": method, "parameters": params, "seed": 11, **extra}


@pytest.mark.parametrize("fam_name", ["family", "bf16"])
@pytest.mark.parametrize("method,params,weights", CASES)
@pytest.mark.parametrize("tile_mb, out_dtype", [(0.004, None), (64, "float32")])
def test_kernels_and_torch_definitions_give_the_same_bytes(request, tmp_path, monkeypatch, fam_name, method, params,
                                                            weights, tile_mb, out_dtype):
    """Every method with a kernel, float32 and bf16 inputs, row slices of split tensors and whole tensors (whose
    thresholds the unit finds itself): the output with the kernels is the output without them."""
    fam = request.getfixturevalue(fam_name)
    cfg = config(fam, method, params, weights, tile_mb=tile_mb, out_dtype=out_dtype)
    used = []
    real = kernels.merge
    monkeypatch.setattr(kernels, "merge", lambda *a, **k: used.append(real(*a, **k)) or used[-1])
    with_kernels = merge(cfg, tmp_path / "kernels")
    assert any(used) == (METHODS[method].kernel.merge is not None)
    without_kernels(monkeypatch, method)
    torch_only = merge(cfg, tmp_path / "torch")
    assert with_kernels["outputs"] == torch_only["outputs"]


def test_units_the_kernels_decline_take_the_torch_path(family, tmp_path, monkeypatch):
    """A NaN in one unit (on_nonfinite: warn), float16 inputs, a float16 output: merge_unit hands those units to
    the torch definition (a tensor comes back instead of the kernels' array) with the same result as a merge
    without kernels, and the non-finite policy still applies (a warning naming the tensor)."""
    name = "model.layers.0.mlp.down_proj.weight"
    sd = load_sd(family.experts[1])
    sd[name][1, 2] = float("nan")
    nan_expert = write_like(family.experts[1], tmp_path / "nan", sd)
    half = [write_like(p, tmp_path / f"half{i}", {k: v.half() for k, v in load_sd(p).items()})
            for i, p in enumerate([family.base, family.experts[0]])]
    base = {"method": "task_arithmetic", "parameters": {"lambda": 0.5}, "tile_mb": 0.004, "on_nonfinite": "warn"}
    cases = [({**base, "base": str(family.base), "experts": [family.expert_strs[0], str(nan_expert)]}, {name}),
             ({**base, "base": str(half[0]), "experts": [str(half[1])]}, "all"),
             ({**base, "base": str(family.base), "experts": [family.expert_strs[0]], "out_dtype": "float16"}, "all")]

    def unit_tiles(cfg):
        job_config = MergeConfig.model_validate(cfg)
        inputs = open_inputs(job_config)
        try:
            job = pipeline.MergeJob(job_config, inputs, plan_merge(job_config, inputs))
            warnings, out = [], {}
            for unit in job.plan.units:
                raws = read_rows(inputs, unit, mapped=True)
                tile = pipeline.merge_unit(job, unit, raws, job.deferred_check(unit, raws, warnings))
                out[unit] = tile if isinstance(tile, torch.Tensor) else tile.copy()
            return out, warnings
        finally:
            inputs.close()

    def as_bytes(tile):
        return tile.contiguous().view(torch.uint8).numpy().tobytes() if isinstance(tile, torch.Tensor) \
            else tile.tobytes()

    for cfg, declined in cases:
        got, warnings = unit_tiles(cfg)
        floats = {u for u in got if not isinstance(got[u], np.ndarray) or got[u].dtype != np.uint8}  # not copied
        by_torch = {u.name for u in floats if isinstance(got[u], torch.Tensor)}
        assert by_torch == (declined if declined != "all" else {u.name for u in floats})
        assert bool(warnings) == (declined == {name})
        with monkeypatch.context() as m:
            without_kernels(m, "task_arithmetic")
            want, _ = unit_tiles(cfg)
        assert all(as_bytes(got[u]) == as_bytes(want[u]) for u in got)


def test_a_merge_with_the_kernels_alone_never_imports_torch(bf16, family, tmp_path):
    """Reading, merging (thresholds included), checking and writing: with bf16 or float32 inputs and a method whose
    math the kernels do, the single-process merge runs without torch (as Ray actors do); same bytes."""
    runs = [({"base": str(bf16.base), "experts": bf16.expert_strs, "method": "ties", "tile_mb": 0.01,
              "parameters": {"density": 0.3, "trim_scope": "global"}}, str(tmp_path / "ties")),
            ({"base": str(family.base), "experts": family.expert_strs[:2], "method": "dare_ties", "tile_mb": 64,
              "parameters": {"density": 0.4, "trim_scope": "tensor"}}, str(tmp_path / "dare_ties"))]
    code = ("import json, sys\n"
            "from mergescale.merge.driver import run_merge\n"
            "for cfg, out in json.loads(sys.argv[1]):\n"
            "    run_merge(cfg, out, progress=False)\n"
            "print('torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "False"
    for cfg, out in runs:
        single = merge(cfg, tmp_path / "single", overwrite=True)
        assert single["outputs"] == json.loads((tmp_path / out / "mergescale_manifest.json").read_text())["outputs"]
