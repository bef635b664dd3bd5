"""The Ray session a command starts or joins (cluster/session.py): an address where nothing listens is an error
naming it, at once, for merge and eval; a killed driver's embedded Ray does not outlive it.

Nothing here starts Ray in the pytest process: the drivers are subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import yaml

from tests.helpers import no_output

pytestmark = pytest.mark.ray
NOBODY = "127.0.0.1:1"  # nothing listens on port 1
CMD_TIMEOUT_S = 120  # ray.init used to retry such an address for minutes


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mergescale.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=CMD_TIMEOUT_S)


def test_check_reachable_names_the_address_without_starting_ray():
    from mergescale.cluster.session import RayUnreachable, check_reachable, ensure_ray
    from mergescale.config import ConfigError

    for address, why in ((NOBODY, "connection refused"), ("ray://127.0.0.1:1", "connection refused"),
                         ("nonsense", "expected host:port")):
        with pytest.raises(RayUnreachable) as e:
            check_reachable(address)
        assert address in str(e.value) and why in str(e.value)
        assert isinstance(e.value, ConfigError)  # exit 2 in every command
    with pytest.raises(RayUnreachable):
        ensure_ray(NOBODY)
    assert not sys.modules["ray"].is_initialized()


def test_merge_with_an_address_nobody_listens_on_exits_2(family, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"method": "average", "experts": family.expert_strs[:2]}))
    out = tmp_path / "out"
    r = run_cli("merge", str(cfg), "--out", str(out), "--workers", "2", "--address", NOBODY, "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error:" in r.stderr and NOBODY in r.stderr and "connection refused" in r.stderr
    assert no_output(out)


def test_eval_with_an_address_nobody_listens_on_exits_2(family, tmp_path):
    from mergescale.eval.fixtures import write_fixture_data

    data = tmp_path / "data"
    write_fixture_data(data, ["copa"], n=4)
    out = tmp_path / "results"
    r = run_cli("eval", str(family.base), "--tasks", "copa", "--data-dir", str(data), "--replicas", "2",
                "--address", NOBODY, "--out", str(out), "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error:" in r.stderr and NOBODY in r.stderr and "connection refused" in r.stderr


def test_train_with_an_address_nobody_listens_on_exits_2(tmp_path):
    from mergescale.eval.fixtures import write_fixture_data
    from mergescale.eval.tasks import tasks_for
    from mergescale.tiny import build_tiny_llama

    task = tasks_for("held-in")[0]
    write_fixture_data(tmp_path / "data", [task], n=8)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(build_tiny_llama(tmp_path / "base", seed=0)), "tasks": [task.name],
                                   "data_dir": str(tmp_path / "data"), "max_steps": 2, "batch_size": 2,
                                   "micro_batch_size": 1, "max_input_len": 32, "max_output_len": 8}))
    out = tmp_path / "out"
    r = run_cli("train", "expert", str(cfg), "--out", str(out), "--address", NOBODY, "-q")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error:" in r.stderr and NOBODY in r.stderr and "connection refused" in r.stderr
    assert not out.exists()


DRIVER = textwrap.dedent("""
    import os, sys, time
    import psutil, ray
    from mergescale.cluster.session import ensure_ray

    ensure_ray()

    @ray.remote
    def pid():
        return os.getpid()

    ray.get([pid.remote() for _ in range(2)])
    session = ray._private.worker._global_node.get_session_dir_path()
    procs = [p for p in psutil.Process().children(recursive=True)]
    print(session, flush=True)
    for p in procs:
        print(p.pid, p.create_time(), " ".join(p.cmdline())[:80], flush=True)
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_killed_drivers_embedded_ray_does_not_outlive_it(tmp_path):
    """SIGKILL a driver whose embedded Ray has agents and workers: every process of that session is gone soon
    after (Ray's own DashboardAgent and RuntimeEnvAgent wait 60 s on the dead GCS first)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs = {}
    try:
        session = proc.stdout.readline().strip()
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            pid, started, cmd = line.split(" ", 2)
            procs[int(pid)] = (float(started), cmd.strip())
        assert session and procs, "the driver did not start Ray"
        names = {psutil.Process(p).name() for p in procs if psutil.pid_exists(p)}
        assert any("DashboardAgent" in n for n in names) and any("RuntimeEnvAgent" in n for n in names), names
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def alive():
            left = []
            for pid, (started, cmd) in procs.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(f"{pid} {p.name()} {cmd}")
                except psutil.NoSuchProcess:
                    pass
            return left

        deadline = time.time() + 30  # well under the agents' 60 s, well over the reaper's ~1 s
        while alive() and time.time() < deadline:
            time.sleep(0.5)
        assert not alive(), f"still running after the driver of {session} was killed:\n" + "\n".join(alive())
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid, (started, _) in procs.items():  # whatever this test started must not outlive it either
            try:
                p = psutil.Process(pid)
                if p.create_time() == started:
                    p.kill()
            except psutil.NoSuchProcess:
                pass
