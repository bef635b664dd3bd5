"""The single-process merge (merge.driver with merge.local.LocalRunner) end to end: atomic commit, resume after an
interrupt, determinism, the Python API."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

import mergescale
from mergescale.checkpoint.output_dir import MANIFEST, partial_dir
from mergescale.merge import driver, local
from mergescale.merge.methods import METHODS
from tests.helpers import load_f32, load_sd, merge, no_output, shard_digests


def counting(monkeypatch, method: str, fail_at: int | None = None) -> list:
    """Wrap a registered method's merge: count calls and raise RuntimeError on call number `fail_at` (1-based)."""
    calls = []
    m = METHODS[method]

    def wrapped(*a, **k):
        calls.append(a[4].name)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("simulated crash")
        return m.merge(*a, **k)

    monkeypatch.setitem(METHODS, method, dataclasses.replace(m, merge=wrapped, kernel=None))
    return calls


@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("dare_linear", {"p": 0.3})])
def test_interrupted_merge_leaves_no_output_and_resumes_identically(micro, tmp_path, monkeypatch, method, params):
    cfg = {"method": method, "base": str(micro.base), "experts": micro.expert_strs, "parameters": params,
           "tile_mb": 700 / 2**20, "seed": 2, "out_shard_size": "20KB"}
    clean = tmp_path / "clean"
    expected = merge(cfg, clean)
    n_units = expected["plan"]["units"]
    assert n_units > 40

    monkeypatch.setattr(local, "JOURNAL_EVERY_S", 0.0)  # journal every unit, so the rerun has something to skip
    out = tmp_path / "out"
    calls = counting(monkeypatch, method, fail_at=25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(cfg, out)
    assert len(calls) == 25
    assert not out.exists()  # nothing at the target name until the commit
    assert partial_dir(out).is_dir()

    monkeypatch.undo()
    calls = counting(monkeypatch, method)
    manifest = merge(cfg, out)  # the same command again: resumes
    assert 0 < len(calls) < n_units  # only the units not yet durable were merged
    assert not partial_dir(out).exists()
    assert manifest["outputs"] == expected["outputs"]
    assert shard_digests(out) == shard_digests(clean)
    assert {k: v["sha256"] for k, v in manifest["outputs"].items()} == shard_digests(out)
    for f in ("model.safetensors.index.json", "config.json"):
        assert (out / f).read_bytes() == (clean / f).read_bytes()


def test_partial_output_of_another_config_is_not_reused(micro, tmp_path, monkeypatch):
    cfg = {"method": "task_arithmetic", "base": str(micro.base), "experts": micro.expert_strs,
           "tile_mb": 700 / 2**20, "parameters": {"lambda": 0.5}}
    monkeypatch.setattr(local, "JOURNAL_EVERY_S", 0.0)
    counting(monkeypatch, "task_arithmetic", fail_at=20)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        merge({**cfg, "parameters": {"lambda": 0.9}}, out)
    monkeypatch.undo()
    manifest = merge(cfg, out)
    clean = merge(cfg, tmp_path / "clean")
    assert manifest["outputs"] == clean["outputs"]


def test_same_config_twice_is_bitwise_identical(family, tmp_path):
    cfg = {"method": "dare_ties", "base": str(family.base), "experts": family.expert_strs,
           "parameters": {"p": 0.5, "density": 0.5}, "seed": 9, "tile_mb": 5000 / 2**20}
    a = merge(cfg, tmp_path / "a")
    b = merge(cfg, tmp_path / "b")
    assert a["outputs"] == b["outputs"]
    assert shard_digests(tmp_path / "a") == shard_digests(tmp_path / "b")
    assert {k: v["sha256"] for k, v in a["outputs"].items()} == shard_digests(tmp_path / "a")
    c = merge({**cfg, "seed": 10}, tmp_path / "c")  # the seed matters
    assert c["outputs"] != a["outputs"]


def test_python_api_with_config_object(family, tmp_path):
    config = mergescale.MergeConfig(
        base=str(family.base), experts=family.expert_strs, method="task_arithmetic", parameters={"lambda": 0.5}
    )
    out = tmp_path / "api"
    manifest = mergescale.merge(config, out, progress=False)
    assert (out / MANIFEST).exists()
    assert json.loads((out / MANIFEST).read_text())["outputs"] == manifest["outputs"]
    base, experts, got = load_f32(family.base), [load_f32(e) for e in family.experts], load_f32(out)
    for n in base:
        want = base[n] + 0.5 * sum(e[n] - base[n] for e in experts)
        torch.testing.assert_close(got[n], want, atol=1e-6, rtol=1e-6)
    # The same merge from a dict and from a YAML file (relative paths resolve next to the file).
    same = mergescale.merge(config.model_dump(by_alias=True, exclude_defaults=True), tmp_path / "dict", progress=False)
    assert same["outputs"] == manifest["outputs"]
    cfg_file = family.base.parent / "api_test.yaml"
    cfg_file.write_text(yaml.safe_dump({"base": "base", "experts": [e.name for e in family.experts],
                                        "method": "task_arithmetic", "parameters": {"lambda": 0.5}}))
    try:
        from_yaml = mergescale.merge(str(cfg_file), tmp_path / "yaml", progress=False)
    finally:
        cfg_file.unlink()
    assert from_yaml["outputs"] == manifest["outputs"]


def test_out_from_config_and_overwrite(family, tmp_path):
    out = tmp_path / "out"
    cfg = {"method": "average", "experts": family.expert_strs[:2], "out": str(out)}
    first = merge(cfg, None)
    assert (out / MANIFEST).exists()
    assert first["files"] == sorted(p.name for p in out.iterdir())
    second = merge({**cfg, "experts": family.expert_strs[1:]}, None, overwrite=True)  # a complete output: replaced
    assert second["outputs"] != first["outputs"]
    assert load_sd(out).keys() == load_sd(family.base).keys()
    assert not list(tmp_path.glob(".out*"))


def test_dry_run_writes_nothing(family, tmp_path):
    out = tmp_path / "out"
    result = driver.run_merge({"method": "ties", "base": str(family.base), "experts": family.expert_strs}, out,
                                dry_run=True, progress=False)
    assert "tensors" in result["description"]
    assert no_output(out) and list(tmp_path.iterdir()) == []


def test_integer_tensors_pass_through(micro, tmp_path):
    """Non-float tensors are copied from the base (or the first expert without one), whatever the tiling."""
    from tests.helpers import write_like

    def with_ints(src, dst, value):
        sd = load_sd(src)
        sd["model.position_ids"] = torch.arange(37, dtype=torch.int64) * value
        sd["model.flags"] = torch.full((5, 3), value, dtype=torch.int32)
        return str(write_like(src, dst, sd))

    base = with_ints(micro.base, tmp_path / "base", 1)
    experts = [with_ints(e, tmp_path / f"e{i}", i + 2) for i, e in enumerate(micro.experts)]
    for tile_mb, use_base in ((64.0, True), (16 / 2**20, True), (16 / 2**20, False)):
        out = tmp_path / f"out{tile_mb}{use_base}"
        cfg = {"method": "ties" if use_base else "average", "experts": experts, "tile_mb": tile_mb}
        if use_base:
            cfg["base"] = base
        merge(cfg, out)
        got, src = load_sd(out), load_sd(base if use_base else experts[0])
        for n in ("model.position_ids", "model.flags"):
            assert got[n].dtype == src[n].dtype and torch.equal(got[n], src[n]), n


def test_fixture_families_are_sharded(family, micro, bf16, scaled):
    from tests.helpers import shard_files

    for fam in (family, micro, bf16, scaled):
        for d in [fam.base, *fam.experts]:
            assert len(shard_files(d)) >= 2, d
            assert (d / "model.safetensors.index.json").exists()
    assert (family.base / "tokenizer.json").exists() and (family.experts[0] / "tokenizer.json").exists()


@pytest.mark.parametrize("method, scans", [("task_arithmetic", False), ("slerp", True)])
def test_merge_pass_scans_for_non_finite_only_without_a_kernel(bf16, tmp_path, monkeypatch, method, scans):
    """The fused kernels see every input value and fall back on NaN/inf, so clean units merged by a kernel are not
    scanned a second time; a method without a kernel applies the policy to every float unit first."""
    from mergescale.merge import kernels, reader

    if not kernels.available():
        pytest.skip("numba kernels not available")
    scanned = []
    real = reader.count_nonfinite_bytes
    monkeypatch.setattr(reader, "count_nonfinite_bytes",
                        lambda raw, code: (scanned.append(raw.size // 2), real(raw, code))[1])  # bf16: 2 bytes
    experts = bf16.expert_strs[:2]
    manifest = merge({"method": method, "base": str(bf16.base), "experts": experts,
                      **({"parameters": {"t": 0.3}} if method == "slerp" else {})}, tmp_path / "out")
    assert manifest["warnings"] == []
    assert bool(scanned) == scans
    if scans:  # every float input byte of every model, once
        with mergescale.checkpoint.read.Checkpoint(bf16.base) as c:
            floats = sum(t.numel for t in c.tensors.values() if t.is_float)
        assert sum(scanned) == floats * (1 + len(experts))
