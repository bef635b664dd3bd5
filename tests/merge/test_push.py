"""A merge pushed into a resident model (merge.push, eval.resident) scores exactly as the same merge written to disk
and loaded by from_pretrained; a second push leaves nothing of the first; a corrupted row is caught by name."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from mergescale.eval.backends import EvalError, HFBackend
from mergescale.eval.resident import ResidentModel
from mergescale.eval.scoring import RankRequest
from mergescale.merge.driver import merge_into
from mergescale.merge.push import PushMismatch, PushOutput
from mergescale.tiny import build_tiny_llama, make_expert
from tests.helpers import load_sd, merge

METHODS = {
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}),
    "ties_tensor": ("ties", {"density": 0.3, "trim_scope": "tensor"}),
    "ties_global": ("ties", {"density": 0.3, "trim_scope": "global"}),
    "dare_ties": ("dare_ties", {"p": 0.5}),
    "dare_linear": ("dare_linear", {"p": 0.4, "lambda": 0.9}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
}


def config(fam, variant: str, out_dtype: str | None = None) -> dict:
    method, params = METHODS[variant]
    cfg = {"base": str(fam.base), "experts": fam.expert_strs, "method": method, "parameters": params, "seed": 3,
           "tile_mb": 0.01}  # several units per tensor: rows arrive in pieces
    if out_dtype:
        cfg["out_dtype"] = out_dtype
    return cfg


def requests(vocab: int, n: int = 6) -> list[RankRequest]:
    rng = random.Random(0)
    return [RankRequest([[rng.randrange(4, vocab) for _ in range(5 + i)]] * 3,
                        [[rng.randrange(4, vocab) for _ in range(1 + j)] for j in range(3)]) for i in range(n)]


def corrupting(load_rows, name: str):
    """`load_rows` flipping one bit of tensor `name`'s first rows after the merge hashed them (in transit)."""

    def load(self, tensor, row_start, data, code):
        if tensor == name and row_start == 0:
            data = data.copy()
            data[5] ^= 1
        return load_rows(self, tensor, row_start, data, code)

    return load


@pytest.fixture(scope="module")
def resident(family):
    return ResidentModel(HFBackend(family.base, max_length=64))


def from_disk(cfg: dict, out) -> tuple[HFBackend, dict]:
    manifest = merge(cfg, out)
    return HFBackend(out, max_length=64), manifest


@pytest.mark.parametrize("out_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("variant", list(METHODS))
def test_push_scores_bitwise_as_the_checkpoint_from_disk(family, resident, tmp_path, variant, out_dtype):
    cfg = config(family, variant, out_dtype)
    manifest = merge_into(cfg, PushOutput(resident), progress=False)
    disk, _ = from_disk(cfg, tmp_path / "merged")
    held = resident.backend.model.state_dict()
    loaded = disk.model.state_dict()
    assert held.keys() == loaded.keys()
    for name, t in loaded.items():  # the parameters themselves, bit for bit (float32 views compared as ints)
        assert held[name].dtype == t.dtype == torch.float32
        assert torch.equal(held[name].view(torch.int32), t.view(torch.int32)), name
    reqs = requests(resident.backend.model.config.vocab_size)
    assert resident.backend.loglikelihood(reqs) == disk.loglikelihood(reqs)
    resident.require(manifest["pushed"]["fingerprint"])
    # the merge's per-tensor digests are those of the bytes written to disk: sha256 of the sha256 of each unit's rows
    written = load_sd(tmp_path / "merged")
    assert manifest["pushed"]["tensors"] == disk_digests(cfg, written)


def disk_digests(cfg: dict, written: dict) -> dict[str, str]:
    """Each tensor's push digest computed from a written checkpoint's tensors and the plan's units."""
    from mergescale.merge.inputs import prepare_inputs

    _, inputs, plan = prepare_inputs(cfg)
    inputs.close()
    out = {}
    for name, units in plan.units_of.items():
        t = written[name].contiguous()
        parts = [t if t.dim() == 0 else t[u.row_start:u.row_end] for u in units]
        assert sum(p.numel() for p in parts) == t.numel(), name  # the units cover the tensor once
        out[name] = hashlib.sha256(b"".join(
            hashlib.sha256(p.reshape(-1).view(torch.uint8).numpy().tobytes()).digest() for p in parts)).hexdigest()
    return out


def test_second_push_leaves_nothing_of_the_first(family, tmp_path):
    """Two pushes in a row, the second another method: the same as a fresh load of the second merge."""
    res = ResidentModel(HFBackend(family.base, max_length=64))
    first = merge_into(config(family, "ties_global"), PushOutput(res), progress=False)
    second_cfg = config(family, "dare_linear", "bfloat16")
    second = merge_into(second_cfg, PushOutput(res), progress=False)
    assert first["pushed"]["fingerprint"] != second["pushed"]["fingerprint"]
    disk, _ = from_disk(second_cfg, tmp_path / "second")
    reqs = requests(res.backend.model.config.vocab_size)
    assert res.backend.loglikelihood(reqs) == disk.loglikelihood(reqs)
    with pytest.raises(EvalError, match="not the merge"):
        res.require(first["pushed"]["fingerprint"])


def test_corrupted_row_is_caught_naming_the_tensor(family, monkeypatch):
    res = ResidentModel(HFBackend(family.base, max_length=64))
    name = "model.layers.1.mlp.down_proj.weight"
    monkeypatch.setattr(ResidentModel, "load_rows", corrupting(ResidentModel.load_rows, name))
    with pytest.raises(PushMismatch, match=name.replace(".", r"\.")):
        merge_into(config(family, "task_arithmetic"), PushOutput(res), progress=False)
    with pytest.raises(EvalError, match="did not complete"):
        res.require("anything")


def test_rounding_resident_checks_what_it_holds(family, tmp_path):
    """A bfloat16 resident of a float32 merge holds the rows rounded as from_pretrained rounds them."""
    res = ResidentModel(HFBackend(family.base, max_length=64, dtype="bfloat16"))
    cfg = config(family, "task_arithmetic")
    merge_into(cfg, PushOutput(res), progress=False)
    merge(cfg, tmp_path / "m")
    disk = HFBackend(tmp_path / "m", max_length=64, dtype="bfloat16")
    for name, t in disk.model.state_dict().items():
        assert torch.equal(res.backend.model.state_dict()[name].view(torch.int16), t.view(torch.int16)), name


def test_tied_embeddings_pushed_once(tmp_path):
    base = build_tiny_llama(tmp_path / "base", seed=1, hidden=32, heads=1, layers=1,
                            tie_word_embeddings=True)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i) for i in range(2)]
    cfg = {"base": str(base), "experts": [str(e) for e in experts], "method": "task_arithmetic",
           "parameters": {"lambda": 0.5}}
    res = ResidentModel(HFBackend(base, max_length=32))
    merge_into(cfg, PushOutput(res), progress=False)
    disk, _ = from_disk(cfg, tmp_path / "m")
    model = res.backend.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, disk.model.lm_head.weight)
    reqs = requests(384, 3)
    assert res.backend.loglikelihood(reqs) == disk.loglikelihood(reqs)


def test_plan_that_misses_a_resident_tensor_is_refused_before_any_row(family, micro):
    """A merge of another architecture: refused naming the tensor, and the resident is untouched."""
    from mergescale.errors import MergeInputError

    res = ResidentModel(HFBackend(family.base, max_length=64))
    before = {k: v.clone() for k, v in res.backend.model.state_dict().items()}
    cfg = {"base": str(micro.base), "experts": micro.expert_strs, "method": "average"}
    with pytest.raises(MergeInputError, match="tensor model"):
        merge_into(cfg, PushOutput(res), progress=False)
    after = res.backend.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert np.isfinite(res.backend.loglikelihood(requests(64, 2))[0]).all()


def test_merge_eval_cli_scores_as_merge_then_eval(family, tmp_path, capsys):
    """`mergescale merge-eval` writes no model, and its per-example log-probabilities are those of `mergescale
    merge` + `mergescale eval` of the written checkpoint; its cache never serves the base's scores."""
    import pyarrow.parquet as pq
    import yaml

    from mergescale.cli import main
    from mergescale.eval.fixtures import write_fixture_data

    data = write_fixture_data(tmp_path / "data", "copa,rte", n=4)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(config(family, "ties_tensor", "bfloat16")))
    common = ["--tasks", "copa,rte", "--data-dir", str(data), "--max-length", "256", "-q"]
    assert main(["merge-eval", str(cfg), "--out", str(tmp_path / "pushed"), *common]) == 0
    assert "nothing written but the results" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.safetensors"))
    assert main(["merge", str(cfg), "--out", str(tmp_path / "merged"), "-q"]) == 0
    assert main(["eval", str(tmp_path / "merged"), "--out", str(tmp_path / "disk"), *common]) == 0
    for task in ("copa", "rte"):
        pushed = pq.read_table(tmp_path / "pushed" / "examples" / f"{task}.parquet").to_pylist()
        disk = pq.read_table(tmp_path / "disk" / "examples" / f"{task}.parquet").to_pylist()
        assert [r["logprobs"] for r in pushed] == [r["logprobs"] for r in disk]
    # the base evaluated into the same results directory computes every example: no score of the merge is reused
    base = {"tasks": "copa,rte", "data_dir": data, "max_length": 256, "progress": False}
    from mergescale.eval import evaluate

    assert evaluate(family.base, out=tmp_path / "pushed", **base)["cached"] == 0
    assert main(["merge-eval", str(tmp_path / "missing.yaml"), *common]) == 2
