"""One Ray session per process: connect to a cluster, or start an embedded local Ray, once, and keep it.

Ray does not support stopping its driver and starting another in the same process: threads of a shut-down
session outlive it and can touch freed state (ray-project/ray#31145). After ray.shutdown() the core worker's
`worker.io` thread and gRPC pollers were still running here at interpreter exit, and a test process that had
cycled five sessions segfaulted at exit after every test had passed. So mergescale never calls ray.shutdown(): the
session the first merge, evaluation or training run of a process starts serves every later one (which also saves
the 5-6 s that `ray.init` takes per call), and Ray's own exit hook stops it.

Two ways Ray itself fails a user here, handled below:
- `ray.init(address=...)` where nothing listens retries for minutes: the address is probed first
  (`check_reachable`), and a refused or unanswered connection is an error naming it within CONNECT_TIMEOUT_S.
- A driver killed without its exit hook (SIGKILL, the OOM killer) takes the embedded Ray's gcs_server and
  raylet with it (Ray starts them with a parent-death signal), but the raylet's DashboardAgent and
  RuntimeEnvAgent (~230 MB) first try to report the raylet's death to the dead GCS, with a 60 s timeout that
  is not configurable, and linger that long. A small watcher process (mergescale/reaper.py) started with the
  embedded session kills what is left of it as soon as the driver is gone.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

from mergescale import reaper
from mergescale.config import ConfigError

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 10.0
# Set in the environment of an embedded Ray (its raylet and so every worker inherit it): a Ray without the
# dashboard, so without the State API (cluster/train.py leaves out what needs it).
NO_STATE_API_ENV = "MERGESCALE_RAY_NO_STATE_API"
IDLE_WORKERS_OVER_CPUS = 4  # idle Ray workers the embedded Ray keeps beyond one per CPU (see ensure_ray)
_reaper_pipe: int | None = None  # the write end the reaper watches: it reads EOF when this process ends


class RayUnreachable(ConfigError):
    """An address where no Ray cluster answers."""



def ensure_ray(address: str | None = None, **init_kw) -> bool:
    """Use the Ray this process already runs; else connect to `address`, or with none start an embedded local Ray.
    Returns True when this call connected or started it. It is never shut down here (see the module docstring).
    RayUnreachable when nothing answers at `address` within CONNECT_TIMEOUT_S."""
    if ray.is_initialized():
        if address:
            log.debug("Ray is already initialized in this process; using it, not %s", address)
        return False
    if address and address != "local":
        check_reachable(address)
        ray.init(address=address, **init_kw)
    else:
        # Ray runs its workers at nice 15 by default, so on a shared machine a training run yields to everything
        # else (3.3 s steps became 20 s here). Run them at the driver's priority unless RAY_worker_niceness asks.
        os.environ.setdefault("RAY_worker_niceness", "0")
        # No job-wide runtime_env: with one, every worker is set up by Ray's runtime-env agent instead of taken
        # from the workers Ray starts with the session, which delays the first tasks (docs/BENCHMARKS.md).
        os.environ[NO_STATE_API_ENV] = "1"
        # Ray keeps as many idle workers as CPUs, counting the zero-CPU processes a study runs beside its
        # evaluations (a training's launcher and controller, a merge's coordinator): those push the warm workers
        # out, and each next evaluation pays a fresh process and its torch import. A few more are kept.
        cpus = init_kw.get("num_cpus") or os.cpu_count() or 1
        os.environ.setdefault("RAY_num_workers_soft_limit", str(int(cpus) + IDLE_WORKERS_OVER_CPUS))
        ray.init(address="local", include_dashboard=False, **init_kw)
        _start_reaper()
    return True


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """RayUnreachable naming `address` unless something accepts a TCP connection at its host and port within
    `timeout` seconds. "auto" is looked up as Ray does (RAY_ADDRESS, then the last cluster started on this node);
    when there is none, ray.init says so at once by itself."""
    target = address.removeprefix("ray://")
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            target = canonicalize_bootstrap_address(address)
        except Exception:  # noqa: BLE001 - a private API: leave the lookup and its errors to ray.init
            return
        if target is None:
            return
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    if not sep or not host or not port.isdigit():
        raise RayUnreachable(f"--address / cluster.address {address!r}: expected host:port, ray://host:port or auto")
    named = address if target == address else f"{address} ({target})"
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except ConnectionRefusedError:
        why = "nothing is listening there (connection refused)"
    except socket.timeout:
        why = f"no answer within {timeout:.0f} s"
    except OSError as e:
        why = str(e)
    else:
        return
    raise RayUnreachable(f"cannot reach a Ray cluster at {named}: {why}. Start one there (`ray start --head`), "
                         "give the address of a running one, or leave --address out for an embedded local Ray")


def _start_reaper() -> None:
    """Start mergescale/reaper.py on the embedded session's processes. It reads a pipe whose write end only this
    process holds (os.pipe's descriptors are not inherited by the processes Ray starts), so it sees EOF when this
    process ends, however it ends."""
    global _reaper_pipe
    try:
        node = ray._private.worker._global_node
        roots = [p.process.pid for procs in node.all_processes.values() for p in procs]
    except Exception:  # noqa: BLE001 - private API: without it there is nothing to watch
        log.debug("cannot list the embedded Ray's processes; no reaper started", exc_info=True)
        return
    _reaper_pipe = reaper.watch(roots)
