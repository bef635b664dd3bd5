"""Fault tolerance of the distributed merge: an actor killed mid-merge, the driver killed mid-merge.

Actors sleep a little per unit (MERGESCALE_UNIT_DELAY_S, read by the merge actors) so the kills land mid-merge.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml

from mergescale.checkpoint.output_dir import partial_dir
from mergescale.cluster.merge import run_distributed_merge
from mergescale.merge.driver import run_merge
from tests.helpers import crash_merge, manifest_digests, replace_weights, shard_bytes, slow_local_ray

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    yield from slow_local_ray(0.08)


def ties_config(fam) -> dict:
    return {"base": str(fam.base), "experts": fam.expert_strs, "method": "dare_ties",
            "parameters": {"p": 0.3, "density": 0.4, "trim_scope": "global"}, "tile_mb": 0.001,
            "out_shard_size": "40KB", "cluster": {"num_cpus": 0.5}}


def journaled(out: Path) -> int:
    j = partial_dir(out) / "done.journal"
    return len(j.read_text().splitlines()) if j.exists() else 0  # a line per unit: its id and input digest


def wait_for(cond, timeout=120.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def expected(micro, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "single"
    manifest = run_merge(ties_config(micro), out, progress=False)
    return shard_bytes(out), manifest["plan"]["units"]


def test_actor_killed_mid_merge_is_replaced_and_output_identical(micro, expected, tmp_path, monkeypatch):
    """Both actors are killed once some units are journaled. Journaled units came from an actor that has returned
    two merge calls (a batch is reported durable by the call after it), so at least one dead actor had written
    rows it had not confirmed as synced: those are merged again, not trusted."""
    import mergescale.cluster.pool as cp

    out = tmp_path / "merged"
    result, requeued = {}, []
    real_requeue = cp.ActorPool._requeue_unsynced

    def recording_requeue(self, slot):
        requeued.extend(slot.unsynced)
        real_requeue(self, slot)

    monkeypatch.setattr(cp.ActorPool, "_requeue_unsynced", recording_requeue)

    def merge():
        try:
            result["manifest"] = run_distributed_merge(ties_config(micro), out, workers=2, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    th = threading.Thread(target=merge)
    th.start()
    wait_for(lambda: journaled(out) >= 3)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("mergescale-merge-")]
    assert len(names) == 2, names
    for name in names:
        ray.kill(ray.get_actor(name), no_restart=True)
    th.join(timeout=300)
    assert "error" not in result, result.get("error")
    manifest = result["manifest"]
    assert manifest["timing"]["actor_replacements"] >= 2
    assert requeued, "a killed actor's written but unconfirmed units are redone"
    merged = sum(a["units"] for a in manifest["distributed"]["actors"])
    assert merged >= expected[1] + len(requeued)  # every unit once, the unconfirmed ones again
    assert shard_bytes(out) == expected[0]
    assert manifest_digests(manifest) == {n: hashlib.sha256(b).hexdigest() for n, b in shard_bytes(out).items()}


def test_driver_killed_mid_merge_resumes_only_unfinished_units(micro, expected, tmp_path):
    cfg_path = tmp_path / "merge.yaml"
    cfg_path.write_text(yaml.safe_dump(ties_config(micro)))
    out = tmp_path / "merged"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "mergescale.cli", "merge", str(cfg_path), "--out", str(out), "--workers", "2",
           "--address", address, "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: journaled(out) >= 4 or proc.poll() is not None, timeout=180)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.kill()  # SIGKILL: no cleanup runs, as when a node or a session dies
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = journaled(out)
    total = expected[1]
    assert not out.exists() and 0 < before < total, (before, total)
    manifest = run_distributed_merge(cfg_path, out, workers=2, progress=False)
    assert manifest["timing"]["units_resumed"] >= before
    redone = sum(a["units"] for a in manifest["distributed"]["actors"])
    assert redone == total - manifest["timing"]["units_resumed"]  # only unfinished units were redone
    assert shard_bytes(out) == expected[0]
    assert not partial_dir(out).exists()
    assert manifest_digests(manifest) == {n: hashlib.sha256(b).hexdigest() for n, b in shard_bytes(out).items()}


def test_single_process_resume_after_crash(micro, expected, tmp_path, monkeypatch):
    """The single-process merge journals too: a crash keeps the partial output and a rerun finishes it."""
    out = tmp_path / "merged"
    crash_merge(ties_config(micro), out, monkeypatch, 25)  # an interrupt mid-merge
    assert not out.exists() and journaled(out) == 24  # every unit before the crash, none after
    manifest = run_merge(ties_config(micro), out, progress=False)
    assert manifest["timing"]["units_resumed"] == 24
    assert shard_bytes(out) == expected[0]
    assert manifest_digests(manifest) == {n: hashlib.sha256(b).hexdigest() for n, b in shard_bytes(out).items()}


@pytest.mark.parametrize("crash_at", [25, 1])
def test_resume_over_replaced_inputs_starts_over_on_ray(micro, tmp_path, monkeypatch, caplog, crash_at):
    """A partial output whose inputs were replaced by other weights of the same layout (the run key cannot tell):
    the driver's actors prove the journal (crash_at 25: units journaled) or the saved statistics as they read the
    rest (crash_at 1: none journaled); either way nothing of it is reused and the output is a clean merge's."""
    import logging
    import shutil


    root = tmp_path / "models"
    base = shutil.copytree(micro.base, root / "base")
    experts = [shutil.copytree(e, root / f"e{i}") for i, e in enumerate(micro.experts)]
    cfg = {**ties_config(micro), "base": str(base), "experts": [str(e) for e in experts]}
    out = tmp_path / "merged"
    crash_merge(cfg, out, monkeypatch, crash_at)  # the same partial output a killed Ray driver leaves
    assert journaled(out) == crash_at - 1
    replace_weights(experts[1], experts[2])

    caplog.set_level(logging.WARNING)
    manifest = run_distributed_merge(cfg, out, workers=2, progress=False)
    clean = run_merge(cfg, tmp_path / "clean", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert manifest_digests(manifest) == manifest_digests(clean)
    assert manifest["timing"]["units_resumed"] == 0
    said = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(said) == 1 and "expert 1" in said[0] and str(experts[1]) in said[0], said
