"""The distributed merge's entry points, for real: the CLI with an embedded Ray, `ray job submit` against a head
started by the test (`ray start --head`), and the KubeRay RayJob manifest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mergescale.config import load_config
from mergescale.merge.driver import run_merge
from tests.helpers import REPO, free_port, shard_bytes

pytestmark = pytest.mark.ray
BIN = Path(sys.executable).parent


def merge_config(fam, tmp_path: Path) -> Path:
    # dare_linear: the entry points do not depend on the method (the byte-identity and threshold tests cover them
    # all); its kernel compiles in seconds, where TIES's take ~40 s in a job's fresh working directory
    cfg = {"base": str(fam.base), "experts": fam.expert_strs, "method": "dare_linear",
           "parameters": {"p": 0.3}, "tile_mb": 0.01, "out_shard_size": "40KB",
           "cluster": {"workers": 2, "num_cpus": 0.5}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_workers_with_embedded_ray(micro, tmp_path):
    cfg = merge_config(micro, tmp_path)
    run_merge(cfg, tmp_path / "single", progress=False)
    proc = subprocess.run(
        [str(BIN / "mergescale"), "merge", str(cfg), "--out", str(tmp_path / "dist"), "--workers", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr  # embedded: no address given
    assert "wrote" in proc.stdout and "actor" in proc.stdout  # summary with per-actor throughput
    assert shard_bytes(tmp_path / "dist") == shard_bytes(tmp_path / "single")
    manifest = json.loads((tmp_path / "dist" / "mergescale_manifest.json").read_text())
    assert manifest["distributed"]["workers"] == 2


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head (`ray start --head --block`) in its own process group; only it is stopped afterwards
    (never `ray stop`, which would kill every Ray on the machine). Token auth off for head and submit alike:
    Ray 2.60 turns token authentication on, and a plain `ray job submit` then fails with "Missing authentication
    token"."""
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    # Short path: Ray's unix sockets live under the temp dir and must fit in 107 bytes.
    temp_dir = Path("/tmp") / f"ms-ray-{os.getpid()}-{port}"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            assert head.poll() is None, head.stdout.read().decode()[-3000:]
            probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env=env, capture_output=True,
                                   timeout=60)
            if probe.returncode == 0:
                break
            assert time.time() - t0 < 180, probe.stderr.decode()[-2000:]
            time.sleep(2)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)  # any straggler of this cluster only


def test_ray_job_submit(micro, tmp_path, ray_head):
    url, env = ray_head
    cfg = merge_config(micro, tmp_path)
    out = tmp_path / "job-out"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO), "--no-wait", "--",
         "python", "-m", "mergescale.cluster.job", "merge", str(cfg), "--out", str(out), "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
    job_id = next(w for line in submit.stdout.splitlines() for w in line.replace("'", " ").split()
                  if w.startswith("raysubmit_"))
    t0, status = time.time(), ""
    while time.time() - t0 < 600:
        st = subprocess.run([str(BIN / "ray"), "job", "status", "--address", url, job_id], env=env, capture_output=True,
                            text=True)
        status = st.stdout.upper()  # "Job '...' succeeded" / "... failed" / "... stopped"
        if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(3)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", url, job_id], env=env, capture_output=True,
                          text=True).stdout
    assert "SUCCEEDED" in status, status + logs[-4000:]
    run_merge(cfg, tmp_path / "single", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "single")
    assert '"outputs"' in logs  # the job printed its manifest summary


def test_kuberay_rayjob_manifest_is_complete():
    doc = yaml.safe_load((REPO / "configs/kuberay/merge-rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    for field in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes",
                  "ttlSecondsAfterFinished", "backoffLimit"):
        assert field in spec, field
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "working_dir" in runtime_env
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"].get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "a GPU worker group"
    # The entrypoint runs a module and a config that exist in this repo, and the config validates.
    argv = spec["entrypoint"].split()
    assert argv[:3] == ["python", "-m", "mergescale.cluster.job"] and argv[3] == "merge"
    import importlib.util

    assert importlib.util.find_spec(argv[2]) is not None
    config = load_config(REPO / argv[4])
    assert config.cluster.num_gpus > 0 and config.cluster.workers >= 2
    # The GPU the config asks for per actor fits the worker pods.
    per_pod = int(gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert config.cluster.num_gpus * config.cluster.workers <= per_pod * gpu_groups[0]["replicas"]
