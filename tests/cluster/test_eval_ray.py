"""Evaluation on K Ray replica actors: same results as K=1, resume across replica counts."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from mergescale.cluster.eval_replicas import balance
from mergescale.eval import evaluate
from mergescale.eval.fixtures import write_fixture_data
from mergescale.tiny import build_tiny_llama

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
TASKS = "copa,rte,wic,common_gen"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("ray")
    model = build_tiny_llama(root / "tiny", seed=5, vocab_size=384)
    data = write_fixture_data(root / "data", TASKS, n=8)
    yield model, data
    if started:
        ray.shutdown()  # only the cluster this module started; never `ray stop`


def _rows(out, task):
    return sorted(pq.read_table(out / "examples" / f"{task}.parquet").to_pylist(), key=lambda r: int(r["example_id"]))


def test_balance_is_even():
    costs = [50, 40, 30, 30, 20, 10, 10, 5]
    parts = balance(costs, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(costs)))
    sums = [sum(costs[i] for i in p) for p in parts]
    assert max(sums) - min(sums) <= max(costs) // 2


def test_two_replicas_equal_one(cluster, tmp_path):
    model, data = cluster
    kw = dict(tasks=TASKS, data_dir=data, max_length=256, chunk_size=3, progress=False)
    one = evaluate(model, replicas=1, address="auto", out=tmp_path / "k1", **kw)  # one actor on the same cluster
    two = evaluate(model, replicas=2, out=tmp_path / "k2", **kw)
    assert one["computed"] == two["computed"] == 32
    for a, b in zip(one["metrics"], two["metrics"]):
        assert {k: v for k, v in a.items() if k != "model_dir"} == pytest.approx(
            {k: v for k, v in b.items() if k != "model_dir"})
    for task in TASKS.split(","):
        ra, rb = _rows(tmp_path / "k1", task), _rows(tmp_path / "k2", task)
        assert len(ra) == len(rb) == 8
        for x, y in zip(ra, rb):
            if "logprobs" in x:
                assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-5)
                assert x["prediction"] == y["prediction"]
            else:
                assert x["generation"] == y["generation"]


def test_resume_across_replica_counts(cluster, tmp_path):
    model, data = cluster
    kw = dict(tasks=TASKS, data_dir=data, max_length=256, chunk_size=2, progress=False, out=tmp_path / "o")
    part = evaluate(model, replicas=2, limit=5, **kw)
    assert part["computed"] == 20
    rest = evaluate(model, replicas=1, **kw)  # in process now; the Ray run's cache is reused
    assert rest["computed"] == 12 and rest["cached"] == 20
    again = evaluate(model, replicas=2, **kw)
    assert again["computed"] == 0


def test_ray_job_entry(cluster, tmp_path, capsys):
    """`python -m mergescale.cluster.job eval ...` (here on this module's cluster)."""
    from mergescale.cluster.job import main

    model, data = cluster
    rc = main(["eval", str(model), "--tasks", "rte", "--data-dir", str(data), "--replicas", "2",
               "--out", str(tmp_path / "j"), "--max-length", "256", "-q"])
    assert rc == 0 and "rte" in capsys.readouterr().out
    assert (tmp_path / "j" / "metrics.parquet").exists()
