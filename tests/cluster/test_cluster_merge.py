"""Distributed merge on Ray: byte-identical to the single-process merge, exact global thresholds, the
Python entry points. One local Ray (2 CPUs) is shared by the whole module."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import ray

from mergescale.cluster.merge import merge_async, run_distributed_merge
from mergescale.cluster.pool import balanced_batches
from mergescale.merge.driver import run_merge
from mergescale.merge.methods import METHODS
from tests.helpers import manifest_digests, shard_bytes

pytestmark = pytest.mark.ray

PARAMS = {
    "average": {},
    "task_arithmetic": {"lambda": 0.7},
    "ties": {"density": 0.3, "trim_scope": "global"},
    "dare_linear": {"p": 0.4, "lambda": 0.8},
    "dare_ties": {"p": 0.3, "density": 0.5, "trim_scope": "global"},
    "slerp": {"t": 0.3},
    "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "model_stock": {},
}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config_for(fam, method: str, tile_mb: float, num_cpus: float = 0.25, **extra) -> dict:
    experts = fam.expert_strs[:2] if method == "slerp" else fam.expert_strs
    return {
        "base": str(fam.base), "experts": experts, "method": method, "parameters": PARAMS[method],
        "tile_mb": tile_mb, "out_shard_size": "40KB", "seed": 7,
        "cluster": {"num_cpus": num_cpus}, **extra,
    }


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_byte_identical_for_any_worker_count_and_tile(method, micro, tmp_path):
    # Two tilings: one that splits every matrix into many row tiles with odd remainders, one that keeps most
    # tensors whole; the single-process output is itself tile-invariant (tested in test_methods).
    expected = {}
    for tile_mb in (0.003, 0.05):
        single = tmp_path / f"single-{tile_mb}"
        run_merge(config_for(micro, method, tile_mb), single, progress=False)
        expected[tile_mb] = shard_bytes(single)
    assert expected[0.003] == expected[0.05]
    # An actor with >= 2 CPUs reads ahead and writes behind on threads (K=1 here); with fewer it runs serially.
    for k, tile_mb, cpus in ((1, 0.003, 2), (2, 0.05, 0.25), (3, 0.003, 0.25), (5, 0.05, 0.25)):
        out = tmp_path / f"k{k}"
        manifest = run_distributed_merge(config_for(micro, method, tile_mb, cpus), out, workers=k, progress=False)
        assert shard_bytes(out) == expected[tile_mb], f"{method} K={k} tile_mb={tile_mb}"
        assert manifest_digests(manifest) == {n: hashlib.sha256(b).hexdigest() for n, b in shard_bytes(out).items()}
        assert len(manifest["distributed"]["actors"]) == k
        assert sum(a["units"] for a in manifest["distributed"]["actors"]) == manifest["plan"]["units"]


def test_global_thresholds_equal_single_process(micro, tmp_path):
    cfg = config_for(micro, "ties", 0.003)
    single = run_merge(cfg, tmp_path / "single", progress=False)
    dist = run_distributed_merge(cfg, tmp_path / "dist", workers=3, progress=False)
    assert dist["global_thresholds"] == single["global_thresholds"]
    # And both equal kthvalue over the concatenated task vectors of each expert (the TIES reference rule).
    import torch

    from tests.helpers import load_f32

    base = load_f32(micro.base)
    for i, e in enumerate(micro.experts):
        sd = load_f32(e)
        tau = torch.cat([(sd[n] - base[n]).reshape(-1) for n in base])
        n = tau.numel()
        k = n - int(0.3 * n)
        assert dist["global_thresholds"]["*"][i]["min"] == torch.kthvalue(tau.abs(), k).values.item()


@pytest.mark.parametrize("cpus", [2, 0.25])
def test_non_finite_warnings_reach_the_manifest(micro, tmp_path, cpus):
    """on_nonfinite: warn in a distributed merge records the same warnings as the single-process merge."""
    import torch

    from tests.helpers import load_sd, write_like

    name = "model.layers.0.mlp.down_proj.weight"
    sd = load_sd(micro.experts[1])
    sd[name][2, 3] = float("nan")
    bad = write_like(micro.experts[1], tmp_path / "bad", sd)
    cfg = {**config_for(micro, "task_arithmetic", 0.003, cpus), "on_nonfinite": "warn"}
    cfg["experts"] = [micro.expert_strs[0], str(bad)]
    single = run_merge(cfg, tmp_path / "single", progress=False)
    dist = run_distributed_merge(cfg, tmp_path / "dist", workers=1 if cpus == 2 else 3, progress=False)
    assert [w for w in single["warnings"] if name in w and "non-finite" in w]
    assert sorted(dist["warnings"]) == sorted(single["warnings"])
    assert shard_bytes(tmp_path / "dist") == shard_bytes(tmp_path / "single")
    assert not bool(torch.isfinite(load_sd(tmp_path / "dist")[name]).all())
    # task_arithmetic's actors run the kernels alone; the one that met the NaN merged that unit with torch
    assert sum(a["loaded_torch"] for a in dist["distributed"]["actors"]) == 1


def test_units_are_balanced_by_bytes():
    from mergescale.merge.inputs import Unit

    units = [Unit(i, f"t{i}", 0, 1) for i in range(40)]
    sizes = {i: (i % 7 + 1) * 1000 for i in range(40)}
    queues = balanced_batches(units, sizes, 3)
    loads = [sum(sizes[u] for batch in q for u in batch) for q in queues]
    assert sorted(u for q in queues for b in q for u in b) == list(range(40))
    assert max(loads) - min(loads) <= max(sizes.values())
    for q in queues:  # each actor reads its units in file order
        flat = [u for b in q for u in b]
        assert flat == sorted(flat)


def test_python_api_blocking_and_async(micro, tmp_path):
    import mergescale

    cfg = mergescale.MergeConfig.model_validate(config_for(micro, "dare_ties", 0.01))
    blocking = mergescale.merge(cfg, tmp_path / "blocking", workers=2, progress=False)
    ref = merge_async(cfg, tmp_path / "async", workers=2)
    assert isinstance(ref, ray.ObjectRef)
    manifest = ray.get(ref, timeout=300)
    assert manifest["outputs"] == blocking["outputs"]
    assert json.loads((tmp_path / "async" / "mergescale_manifest.json").read_text())["outputs"] == manifest["outputs"]


def test_infeasible_placement_errors_before_output(micro, tmp_path):
    cfg = config_for(micro, "average", 0.05, cluster={"num_cpus": 64, "placement_timeout_s": 2})
    out = tmp_path / "never"
    with pytest.raises(Exception, match="cannot place 2 merge workers"):
        run_distributed_merge(cfg, out, workers=2, progress=False)
    assert not out.exists()


def test_bad_input_errors_before_output_and_stops_the_actors(micro, tmp_path):
    """The actors are created before the driver validates the inputs; an input error still comes before any
    output, and the actors it started are gone afterwards."""
    bad = tmp_path / "bad-expert"
    bad.mkdir()
    (bad / "config.json").write_text((micro.base / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    cfg = config_for(micro, "average", 0.05)
    cfg["experts"] = [*cfg["experts"][:1], str(bad)]
    out = tmp_path / "never"
    with pytest.raises(Exception, match="model.safetensors"):
        run_distributed_merge(cfg, out, workers=2, progress=False)
    assert not out.exists()

    def alive():
        return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("mergescale-merge-")]

    deadline = time.time() + 10  # ray.kill is asynchronous
    while alive() and time.time() < deadline:
        time.sleep(0.1)
    assert alive() == []


def test_driver_places_actors_before_loading_torch():
    """What lets the actors start while the driver validates: the config schema and the Ray driver module load
    without torch (the actors and the driver's validation import it)."""
    import subprocess
    import sys

    code = ("import sys, mergescale, mergescale.config, mergescale.cluster.merge, mergescale.cluster.pool; "
            "print(sorted(m for m in ('torch', 'numba') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr



def test_merge_without_statistics_never_loads_torch(micro, bf16, tmp_path):
    """A method without a statistics pass is validated, planned, handed out and committed by a driver that never
    imports torch or numba, and merged by actors that never import torch (the kernels alone): a lighter head
    node, actors that start ~1.4 s sooner. Run in a fresh interpreter, where the first call starts an embedded Ray
    that the next two reuse, for average on float32 inputs, dare_linear on bf16 ones (into float32) and dare_ties
    without an extra trim (density 1); the outputs are the single-process merges'."""
    import subprocess
    import sys

    code = ("import json, sys, ray\n"
            "from mergescale.cluster.merge import run_distributed_merge\n"
            "actors, nodes = [], []\n"
            "for cfg, out in json.loads(sys.argv[1]):\n"
            "    m = run_distributed_merge(cfg, out, workers=2, progress=False)\n"
            "    actors += [a['loaded_torch'] for a in m['distributed']['actors']]\n"
            "    nodes.append(ray.get_runtime_context().get_node_id())  # raises if the call stopped its Ray\n"
            "print(json.dumps([actors, sorted(m for m in ('torch', 'numba') if m in sys.modules), len(set(nodes))]))\n")
    runs = [(config_for(micro, "average", 0.003, 1), str(tmp_path / "average")),
            ({**config_for(bf16, "dare_linear", 0.01, 1), "out_dtype": "float32"}, str(tmp_path / "dare_linear")),
            ({**config_for(bf16, "dare_ties", 0.01, 1), "parameters": {"p": 0.5}}, str(tmp_path / "dare_ties"))]
    res = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # ... and the embedded Ray the first call started served the other two (cluster/session.py): one node
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [[False] * 6, [], 1]
    for cfg, out in runs:
        run_merge(cfg, tmp_path / "single", progress=False, overwrite=True)
        assert shard_bytes(Path(out)) == shard_bytes(tmp_path / "single")


def test_threshold_merges_coordinated_without_torch(micro, bf16, tmp_path):
    """The threshold methods' statistics passes are coordinated by a driver that never imports torch or numba: an
    actor samples the first windows, the actors count, the driver adds their numpy counts and resolves the
    queries. Fresh interpreter with its own embedded Ray: TIES with whole-model and per-tensor trims (rows split
    into many units, so per-tensor TIES has a selection pass too), DARE-TIES with a per-tensor trim and
    breadcrumbs (two bounds per expert); the outputs and whole-model thresholds are the single-process merge's.
    The TIES and DARE-TIES actors sample, count and merge with the kernels alone and never
    import torch either; breadcrumbs, which has no fused kernels, does."""
    import subprocess
    import sys

    code = ("import json, sys, ray\n"
            "from mergescale.cluster.merge import run_distributed_merge\n"
            "ray.init(address='local', num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
            "ms = [run_distributed_merge(cfg, out, workers=2, progress=False)\n"
            "      for cfg, out in json.loads(sys.argv[1])]\n"
            "th = [m['global_thresholds'] for m in ms]\n"
            "actors = [[a['loaded_torch'] for a in m['distributed']['actors']] for m in ms]\n"
            "print(json.dumps([th, actors, sorted(m for m in ('torch', 'numba') if m in sys.modules)]))\n")
    runs = [(config_for(micro, "ties", 0.003), str(tmp_path / "ties-global")),
            ({**config_for(bf16, "ties", 0.01), "parameters": {"density": 0.2, "trim_scope": "tensor"}},
             str(tmp_path / "ties-tensor")),
            ({**config_for(bf16, "dare_ties", 0.01), "parameters": {"p": 0.3, "density": 0.4, "trim_scope": "tensor",
                                                                     "sign": "count"}}, str(tmp_path / "dare-ties")),
            (config_for(micro, "breadcrumbs", 0.003), str(tmp_path / "breadcrumbs"))]
    res = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    thresholds, actors_torch, loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert loaded == []
    assert actors_torch == [[False, False]] * 3 + [[True, True]]
    for (cfg, out), th in zip(runs, thresholds):
        single = run_merge(cfg, tmp_path / "single", progress=False, overwrite=True)
        assert shard_bytes(Path(out)) == shard_bytes(tmp_path / "single"), out
        assert th == single["global_thresholds"]
    assert thresholds[0] is not None and thresholds[1] is None
    from mergescale.merge.inputs import prepare
    from mergescale.merge.statistics import statistics_work

    config, _, inputs, plan = prepare(runs[1][0], tmp_path / "unused", False)
    inputs.close()
    assert statistics_work("ties", config.method_params, plan, len(bf16.experts)).selection_units  # a pass ran


def test_actor_samples_the_windows_the_single_process_merge_starts_from(micro, tmp_path):
    """The first counting windows an actor samples for the coordinator are the ones the single-process merge
    places (so both take the same passes); an actor that died before sampling leaves every query at the whole
    range (exact all the same, a pass more)."""
    from mergescale.cluster.pool import ActorPool
    from mergescale.merge.inputs import prepare
    from mergescale.merge.pipeline import MergeJob, sample_windows
    from mergescale.merge.selection import RADIX
    from mergescale.merge.statistics import statistics_work

    config, out, inputs, plan = prepare(config_for(micro, "ties", 0.003), tmp_path / "out", False)
    try:
        work = statistics_work(config.method, config.method_params, plan, len(inputs.experts))
        sample_windows(MergeJob(config, inputs, plan), work)
        want = {(q.stream, q.tag): q.window for q in work.selector.queries}
    finally:
        inputs.close()
    assert len(want) == len(micro.experts) and all(w != RADIX for w in want.values())
    pool = ActorPool(config, 1)
    try:
        pool.start(config, out, plan.layout.fingerprint(), "key")
        assert pool.sample_windows() == want
        ray.kill(pool.slots[0].actor, no_restart=True)
        assert pool.sample_windows() == {}
    finally:
        pool.shutdown()


def test_actor_seeing_other_inputs_is_a_clear_error(micro, tmp_path):
    """An actor whose node sees different input files than the driver (a stale mount) refuses to start; the
    driver raises that error itself, not Ray's wrapper around it."""
    from mergescale.cluster.pool import ActorPool
    from mergescale.config import load_config
    from mergescale.errors import MergeInputError

    config = load_config(config_for(micro, "average", 0.05))
    pool = ActorPool(config, 1)
    try:
        with pytest.raises(MergeInputError, match="sees different input files than the driver") as err:
            pool.start(config, tmp_path / "out", "not-the-driver's-layout", "key")
        assert type(err.value) is MergeInputError  # Ray's RayTaskError(MergeInputError) subclass carries its traceback
    finally:
        pool.shutdown()


def test_merged_values_that_overflow_follow_on_nonfinite_on_actors(micro, tmp_path):
    """The actors check what they merge as the single-process merge does: 3e38 + 3e38 is inf in float32 (the
    RMSNorm weights are ~1), an error naming the tensor, or with on_nonfinite: warn, written and recorded."""
    from mergescale.errors import MergeInputError
    from tests.helpers import no_output

    cfg = {"experts": [{"path": e, "weight": 3e38} for e in micro.expert_strs[:2]], "method": "average",
           "parameters": {"normalize": False}, "tile_mb": 0.05, "cluster": {"num_cpus": 0.25}}
    out = tmp_path / "dist"
    with pytest.raises(MergeInputError, match=r"merge produced \d+ non-finite values \(NaN/inf\) in tensor '.*norm"):
        run_distributed_merge(cfg, out, workers=2, progress=False)
    assert no_output(out)
    cfg["on_nonfinite"] = "warn"
    dist = run_distributed_merge(cfg, out, workers=2, progress=False)
    single = run_merge(cfg, tmp_path / "single", progress=False)
    assert sorted(dist["warnings"]) == sorted(single["warnings"]) and single["warnings"]
    assert shard_bytes(out) == shard_bytes(tmp_path / "single")
