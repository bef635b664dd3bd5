"""Per-tensor TIES of split tensors in the merge pass alone (pipeline.HeldTensor): the bytes of selecting first.

The budget for held tensors is half a tile per model; the tiny models here are split at tiles far smaller than
their tensors, so the tests raise it (`held_budget`) to make every split tensor held, and compare with runs
where none is (the selection pass first), with the plain reference of tests/merge/test_methods.py, and through the
fallbacks (a missed bracket, a NaN, a resumed run)."""

from __future__ import annotations

import math

import pytest
import torch

from mergescale.config import MergeConfig
from mergescale.errors import MergeInputError
from mergescale.merge import local, pipeline, statistics
from tests.helpers import load_f32, load_sd, merge, no_output, write_like
from tests.merge.test_methods import VARIANTS, assert_matches, reference, variant_config


def merge_config(cfg: dict) -> MergeConfig:
    return MergeConfig.model_validate(cfg)

HELD_VARIANTS = ["ties_tensor_mass", "ties_tensor_count", "dare_ties_trim_tensor"]
TILE = 700 / 2**20  # 5 rows of a 32-wide float32 tensor: every matrix of the micro family is split


@pytest.fixture
def spy(monkeypatch):
    """Held tensors allowed whatever their size; records which tensors were held and which fell back."""
    seen = {"held": set(), "fallback": set()}
    monkeypatch.setattr(statistics, "held_budget", lambda config, inputs: 2**40)
    real_held, real_fallback = pipeline.held_brackets, pipeline.HeldTensor._fallback

    def held_brackets(*a, **k):
        got = real_held(*a, **k)
        seen["held"] |= set(got)
        return got

    def fallback(self):
        seen["fallback"].add(self.name)
        return real_fallback(self)

    monkeypatch.setattr(local, "held_brackets", held_brackets)
    monkeypatch.setattr(pipeline.HeldTensor, "_fallback", fallback)
    return seen


def selecting_first(monkeypatch, cfg, out):
    with monkeypatch.context() as m:
        m.setattr(local, "held_brackets", lambda *a, **k: {})
        return merge(cfg, out)


def same_bytes(a, b) -> None:
    ga, gb = load_sd(a), load_sd(b)
    assert set(ga) == set(gb)
    for name in ga:
        assert ga[name].dtype == gb[name].dtype
        assert torch.equal(ga[name].view(torch.uint8) if ga[name].dtype != torch.bool else ga[name],
                           gb[name].view(torch.uint8) if gb[name].dtype != torch.bool else gb[name]), name


def split_float_tensors(manifest_cfg_fam, tile) -> set[str]:
    """Names of float tensors with more rows than one tile holds (the candidates for holding)."""
    sd = load_f32(manifest_cfg_fam)
    out = set()
    for name, t in sd.items():
        row_numel = t[0].numel() if t.dim() else 1
        if t.dim() and t.shape[0] > max(1, int(tile * 2**20) // (row_numel * 4)):
            out.add(name)
    return out


@pytest.mark.parametrize("variant", HELD_VARIANTS)
def test_held_tensors_give_the_bytes_of_selecting_first(micro, tmp_path, monkeypatch, spy, variant):
    cfg = variant_config(micro, variant, tile_mb=TILE)
    held = merge(cfg, tmp_path / "held")
    split = split_float_tensors(micro.base, TILE)
    assert spy["held"] == split and len(split) >= 3  # every split tensor was held ...
    assert not spy["fallback"]  # ... and its sampled brackets held
    selecting_first(monkeypatch, cfg, tmp_path / "first")
    same_bytes(tmp_path / "held", tmp_path / "first")
    assert_matches(tmp_path / "held", reference(micro, variant))
    assert held["timing"]["units_total"] == merge(cfg, tmp_path / "again")["timing"]["units_total"]


def test_held_bf16_into_float32_output(bf16, tmp_path, monkeypatch, spy):
    cfg = {"method": "dare_ties", "base": str(bf16.base), "experts": bf16.expert_strs, "seed": 3, "tile_mb": 0.01,
           "parameters": {"p": 0.5, "density": 0.3, "trim_scope": "tensor"}, "out_dtype": "float32"}
    merge(cfg, tmp_path / "held")
    assert spy["held"] and not spy["fallback"]
    selecting_first(monkeypatch, cfg, tmp_path / "first")
    same_bytes(tmp_path / "held", tmp_path / "first")


def test_missed_brackets_fall_back_to_selecting_first(micro, tmp_path, monkeypatch, spy):
    cfg = variant_config(micro, "ties_tensor_mass", tile_mb=TILE)
    real = local.held_brackets

    def wrong(*a, **k):  # brackets far below every threshold: the counts after the last unit disprove them
        got = real(*a, **k)
        for b in got.values():
            b.lo, b.hi = [0.0] * len(b.lo), [1e-30] * len(b.hi)
        return got

    monkeypatch.setattr(local, "held_brackets", wrong)
    merge(cfg, tmp_path / "held")
    assert spy["fallback"] == spy["held"] and spy["held"]
    selecting_first(monkeypatch, cfg, tmp_path / "first")
    same_bytes(tmp_path / "held", tmp_path / "first")
    assert_matches(tmp_path / "held", reference(micro, "ties_tensor_mass"))


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_non_finite_value_in_a_held_tensor(micro, tmp_path, monkeypatch, spy, policy):
    sd = load_f32(micro.experts[1])
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name][7, 3] = math.nan  # a row of its second unit: the sample (every 8th value of some rows) may miss it
    bad = write_like(micro.experts[1], tmp_path / "bad", sd)
    cfg = variant_config(micro, "ties_tensor_mass", tile_mb=TILE, on_nonfinite=policy)
    cfg["experts"] = [cfg["experts"][0], str(bad), cfg["experts"][2]]
    out = tmp_path / "out"
    if policy == "error":
        with pytest.raises(MergeInputError, match=rf"{bad}.*{name}.*non-finite"):
            merge(cfg, out)
        assert no_output(out)
        return
    manifest = merge(cfg, out)
    assert any(name in w and "non-finite" in w for w in manifest["warnings"])
    assert name not in spy["held"] or name in spy["fallback"]
    selecting_first(monkeypatch, cfg, tmp_path / "first")
    same_bytes(out, tmp_path / "first")


def test_resume_with_a_held_tensor_partly_written(micro, tmp_path, monkeypatch, spy):
    """A crash while a held tensor's rows are being written: the rerun selects first for that tensor (its
    written units are kept) and holds the ones not started; same bytes as an uninterrupted merge."""
    cfg = variant_config(micro, "ties_tensor_mass", tile_mb=TILE, out_shard_size="20KB")
    clean = merge(cfg, tmp_path / "clean")
    monkeypatch.setattr(local, "JOURNAL_EVERY_S", 0.0)
    from mergescale.checkpoint.write import PartialOutput

    real_write, writes = PartialOutput.write_rows, []
    target = sorted(spy["held"])[0] if spy["held"] else None
    assert target is not None

    def failing(self, name, row_start, tile):
        writes.append(name)
        if name == target and writes.count(name) == 2:
            raise RuntimeError("simulated crash")
        return real_write(self, name, row_start, tile)

    with monkeypatch.context() as m:
        m.setattr(PartialOutput, "write_rows", failing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            merge(cfg, tmp_path / "out")
    spy["held"].clear()
    selected = []
    real_stats = local.local_statistics

    def stats(job, reader, work, *a, **k):
        selected.append({u.name for u in work.selection_units})
        return real_stats(job, reader, work, *a, **k)

    monkeypatch.setattr(local, "local_statistics", stats)
    manifest = merge(cfg, tmp_path / "out")
    assert 0 < manifest["timing"]["units_resumed"] < clean["timing"]["units_total"]
    assert {target} in selected and target not in spy["held"]
    assert manifest["outputs"] == clean["outputs"]
    same_bytes(tmp_path / "out", tmp_path / "clean")


def test_a_tensor_is_held_only_within_the_budget(micro, tmp_path, monkeypatch):
    """Held: a split tensor whose output rows plus the elements its brackets list (the sample's share) fit the
    budget, which by default is half a tile per model, so held memory does not grow with the model."""
    from mergescale.merge.inputs import prepare

    cfg = variant_config(micro, "ties_tensor_mass", tile_mb=TILE)
    config, _, inputs, plan = prepare(merge_config(cfg), tmp_path / "x", False)
    try:
        assert statistics.held_budget(config, inputs) == 4 * config.tile_bytes // 2
        job, todo = pipeline.MergeJob(config, inputs, plan), {u.id for u in plan.units}
        name = "model.embed_tokens.weight"  # 64 x 32 float32
        n = 64 * 32

        def held(budget):
            monkeypatch.setattr(statistics, "held_budget", lambda c, i: budget)
            return pipeline.held_brackets(job, todo)

        b = held(2**40)[name]
        assert 0 < b.share <= 1 and len(set(b.ks)) == 1 and 0 < b.ks[0] <= n
        need = n * 4 + b.share * n * (4 * 3 + 12)
        assert name in held(math.ceil(need))
        assert name not in held(math.floor(need) - 1)
        assert not held(4 * config.tile_bytes // 2)  # the default at this tile: 1.4 KB, no tensor fits
    finally:
        inputs.close()


def test_global_trim_and_other_methods_hold_nothing(micro, tmp_path, spy):
    for variant in ["ties_global_mass", "breadcrumbs_tensor", "dare_linear"]:
        merge(variant_config(micro, variant, tile_mb=TILE), tmp_path / variant)
    assert not spy["held"]
    assert set(VARIANTS) >= set(HELD_VARIANTS)
