"""Every bad input fails with a message naming the model, file and tensor, and leaves no output behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mergescale.errors import MergeInputError
from tests.helpers import load_sd, merge, no_output, weight_map, write_like

NAME = "model.layers.1.mlp.down_proj.weight"


def cfg_for(family, expert, method="task_arithmetic", **extra):
    return {"method": method, "base": str(family.base), "experts": [family.expert_strs[0], str(expert)], **extra}


def fails(cfg, out, *fragments, exc=MergeInputError):
    with pytest.raises(exc) as e:
        merge(cfg, out)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in message:\n{msg}"
    assert no_output(out)
    return msg


@pytest.fixture
def expert_sd(family):
    return load_sd(family.experts[1])


def test_missing_tensor(family, tmp_path, expert_sd):
    del expert_sd[NAME]
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    ref_file = weight_map(family.base)[NAME]
    fails(cfg_for(family, bad), tmp_path / "out", str(bad), "missing 1 tensors", NAME, ref_file)


def test_extra_tensor(family, tmp_path, expert_sd):
    expert_sd["model.layers.1.extra.weight"] = torch.zeros(3, 4)
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    file = weight_map(bad)["model.layers.1.extra.weight"]
    fails(cfg_for(family, bad), tmp_path / "out", str(bad), "1 extra tensors", "model.layers.1.extra.weight", file)


def test_mismatched_shape(family, tmp_path, expert_sd):
    expert_sd[NAME] = expert_sd[NAME][:, :-1].contiguous()
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    shape = list(expert_sd[NAME].shape)
    want = [shape[0], shape[1] + 1]
    fails(cfg_for(family, bad), tmp_path / "out", str(bad), "other shapes", f"{NAME} {shape}", str(want),
          weight_map(family.base)[NAME])


def test_float_vs_integer_tensor(family, tmp_path, expert_sd):
    expert_sd[NAME] = torch.zeros(expert_sd[NAME].shape, dtype=torch.int32)
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    fails(cfg_for(family, bad), tmp_path / "out", "float in one model, integer in the other", NAME)


def test_base_as_reference_lists_many_names(family, tmp_path, expert_sd):
    """More than a handful of missing names: the first few are listed and the count is exact."""
    dropped = [n for n in expert_sd if n.startswith("model.layers.1.")]
    for n in dropped:
        del expert_sd[n]
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    msg = fails(cfg_for(family, bad), tmp_path / "out", f"missing {len(dropped)} tensors", "...")
    assert sum(n in msg for n in dropped) == 5


def test_architecture_mismatch(family, tmp_path):
    bad = shutil.copytree(family.experts[1], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mistral", ["MistralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    fails(cfg_for(family, bad), tmp_path / "out", str(bad / "config.json"), "'mistral'", "MistralForCausalLM",
          "'llama'", "LlamaForCausalLM", "allow_architecture_mismatch")
    manifest = merge(cfg_for(family, bad, allow_architecture_mismatch=True), tmp_path / "ok")
    assert (tmp_path / "ok" / "config.json").exists() and manifest["outputs"]
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["model_type"] == "llama"


def test_missing_config_json_in_reference(family, tmp_path):
    bad = shutil.copytree(family.base, tmp_path / "noconfig")
    (bad / "config.json").unlink()
    fails({"method": "task_arithmetic", "base": str(bad), "experts": family.expert_strs}, tmp_path / "out",
          str(bad), "no config.json")


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                            ("ties", {"density": 0.3, "trim_scope": "tensor"})])
def test_non_finite_values(family, tmp_path, expert_sd, method, params):
    expert_sd[NAME][3, 5] = float("nan")
    expert_sd[NAME][7, 1] = float("inf")
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    fails(cfg_for(family, bad, method=method, parameters=params), tmp_path / "out",
          str(bad), NAME, "2 non-finite values", weight_map(bad)[NAME], "on_nonfinite")
    out = tmp_path / "warned"
    manifest = merge(cfg_for(family, bad, method=method, parameters=params, on_nonfinite="warn"), out)
    assert any(NAME in w and "non-finite" in w for w in manifest["warnings"])
    assert len(manifest["warnings"]) == len(set(manifest["warnings"]))
    assert json.loads((out / "mergescale_manifest.json").read_text())["warnings"] == manifest["warnings"]
    got = load_sd(out)
    assert not bool(torch.isfinite(got[NAME]).all())
    assert all(bool(torch.isfinite(t).all()) for n, t in got.items() if n != NAME)


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_non_finite_values_in_the_base(family, tmp_path, method):
    """`average` does not use the base, but a base with NaN is still bad input, named like any other."""
    sd = load_sd(family.base)
    sd[NAME][2, 2] = float("nan")
    bad = write_like(family.base, tmp_path / "badbase", sd)
    cfg = {"method": method, "base": str(bad), "experts": family.expert_strs[:2]}
    fails(cfg, tmp_path / "out", str(bad), NAME, "1 non-finite values")


def test_non_finite_warn_is_recorded_once_with_statistics_passes(family, tmp_path, expert_sd):
    """TIES reads every unit three times (two threshold passes and the merge): one warning per bad unit."""
    expert_sd[NAME][0, 0] = float("nan")
    bad = write_like(family.experts[1], tmp_path / "bad", expert_sd)
    # NaN magnitudes would poison the threshold; the warning must still be there, once.
    manifest = merge(cfg_for(family, bad, method="ties", parameters={"density": 0.5, "trim_scope": "global"},
                             on_nonfinite="warn"), tmp_path / "out")
    assert len([w for w in manifest["warnings"] if NAME in w and str(bad) in w]) == 1  # the input's
    assert len([w for w in manifest["warnings"] if NAME in w and "the merge produced" in w]) == 1  # the output's


def test_truncated_file(family, tmp_path):
    bad = shutil.copytree(family.experts[1], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    fails(cfg_for(family, bad), tmp_path / "out", str(shard), "truncated")
    shard.write_bytes(data[:5])
    fails(cfg_for(family, bad), tmp_path / "out", str(shard), "no header")


def test_corrupt_header(family, tmp_path):
    bad = shutil.copytree(family.experts[1], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!{]"
    shard.write_bytes(bytes(data))
    fails(cfg_for(family, bad), tmp_path / "out", str(shard), "corrupt safetensors header")
    data[:8] = (2**40).to_bytes(8, "little")  # a header length past the end of the file
    shard.write_bytes(bytes(data))
    fails(cfg_for(family, bad), tmp_path / "out", str(shard), "corrupt or truncated")


def test_index_points_to_missing_shard(family, tmp_path):
    bad = shutil.copytree(family.experts[1], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[1]
    shard.unlink()
    fails(cfg_for(family, bad), tmp_path / "out", str(bad / "model.safetensors.index.json"), shard.name,
          "does not exist")


def test_missing_model_directory(family, tmp_path):
    fails(cfg_for(family, tmp_path / "nowhere"), tmp_path / "out", str(tmp_path / "nowhere"), "does not exist")


def pickle_expert(family, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    torch.save(load_sd(family.experts[1]), d / "pytorch_model.bin")
    shutil.copyfile(family.experts[1] / "config.json", d / "config.json")
    return d


def test_pickle_only_checkpoint_refused(family, tmp_path):
    d = pickle_expert(family, tmp_path)
    fails(cfg_for(family, d), tmp_path / "out", str(d), "pytorch_model.bin", "pickle", "allow_pickle")


def test_pickle_checkpoint_with_allow_pickle_merges_like_safetensors(family, tmp_path):
    d = pickle_expert(family, tmp_path)
    params = {"density": 0.3}
    a = merge(cfg_for(family, d, method="ties", parameters=params, allow_pickle=True, tile_mb=3000 / 2**20),
              tmp_path / "pickle")
    b = merge(cfg_for(family, family.experts[1], method="ties", parameters=params, tile_mb=3000 / 2**20),
              tmp_path / "safe")
    assert a["outputs"] == b["outputs"]


def test_pickle_loaded_with_weights_only(family, tmp_path):
    """A pickle that needs arbitrary code (weights_only=True refuses it) is an error naming the file."""
    d = tmp_path / "evil"
    d.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "obj": _Opaque()}, d / "pytorch_model.bin")
    shutil.copyfile(family.experts[1] / "config.json", d / "config.json")
    fails(cfg_for(family, d, allow_pickle=True), tmp_path / "out", str(d / "pytorch_model.bin"), "weights_only=True")


class _Opaque:
    pass


def test_output_exists_without_overwrite(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeInputError) as e:
        merge({"method": "average", "experts": family.expert_strs}, out)
    assert str(out) in str(e.value) and "already exists" in str(e.value) and "--overwrite" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not (tmp_path / ".out.partial").exists()


def test_tokenizer_source_without_metadata(family, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    fails({"method": "average", "experts": family.expert_strs, "tokenizer_source": str(empty)}, tmp_path / "out",
          "tokenizer_source", str(empty))


@pytest.mark.parametrize("target", ["base", "parent"])
def test_output_over_an_input_is_refused_even_with_overwrite(family, tmp_path, target):
    import shutil as sh

    root = tmp_path / "models"
    base = sh.copytree(family.base, root / "base")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    out = base if target == "base" else root
    with pytest.raises(MergeInputError, match="holds the input model"):
        merge({"method": "task_arithmetic", "base": str(base), "experts": family.expert_strs}, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before
    assert not (out.parent / f".{out.name}.partial").exists()
