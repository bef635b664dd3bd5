"""Multi-node merges on `ray.cluster_utils.Cluster` (several Ray nodes on this machine): units really run on
different nodes, and a node removed mid-merge does not change the output."""

from __future__ import annotations

import os
import threading
import time

import pytest
import ray
from ray.cluster_utils import Cluster

from mergescale.checkpoint.output_dir import partial_dir
from mergescale.cluster.merge import run_distributed_merge
from mergescale.cluster.worker import UNIT_DELAY_ENV
from mergescale.merge.driver import run_merge
from tests.helpers import shard_bytes

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    os.environ[UNIT_DELAY_ENV] = "0.05"  # so the node removal lands mid-merge
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        workers = [c.add_node(num_cpus=1) for _ in range(3)]
        c.wait_for_nodes()
    finally:
        del os.environ[UNIT_DELAY_ENV]
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def config(fam) -> dict:
    return {"base": str(fam.base), "experts": fam.expert_strs, "method": "ties",
            "parameters": {"density": 0.3, "trim_scope": "global"}, "tile_mb": 0.001, "out_shard_size": "40KB",
            "cluster": {"num_cpus": 0.5, "placement": "STRICT_SPREAD"}}


@pytest.fixture(scope="module")
def expected(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "single"
    run_merge(config(micro), out, progress=False)
    return shard_bytes(out)


def test_units_run_on_different_nodes(cluster, micro, expected, tmp_path):
    manifest = run_distributed_merge(config(micro), tmp_path / "m", workers=4, progress=False)
    nodes_of_units = set(manifest["distributed"]["unit_nodes"].values())
    nodes_of_actors = {a["node"] for a in manifest["distributed"]["actors"]}
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes_of_actors) == 4 and nodes_of_actors <= alive  # STRICT_SPREAD: one actor per node
    assert len(nodes_of_units) >= 3  # and they all did real work
    assert len(manifest["distributed"]["unit_nodes"]) == manifest["plan"]["units"]
    assert shard_bytes(tmp_path / "m") == expected


def test_node_removed_mid_merge(cluster, micro, expected, tmp_path):
    c, workers = cluster
    cfg = config(micro)  # STRICT_SPREAD over all 4 nodes: the removed node surely hosts an actor
    out = tmp_path / "m"
    result = {}

    def merge():
        try:
            result["manifest"] = run_distributed_merge(cfg, out, workers=4, progress=False)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    th = threading.Thread(target=merge)
    th.start()
    journal = partial_dir(out) / "done.journal"
    t0 = time.time()
    while not (journal.exists() and len(journal.read_text().split()) >= 3):
        assert time.time() - t0 < 180 and th.is_alive(), result
        time.sleep(0.05)
    victim = workers[-1]
    c.remove_node(victim)
    th.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert result["manifest"]["timing"]["actor_replacements"] >= 1
    assert shard_bytes(out) == expected
    assert not partial_dir(out).exists()
