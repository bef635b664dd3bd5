"""One Ray session per process: connect to a cluster, or start an embedded local Ray, once, and keep it.

Ray does not support stopping its driver and starting another in the same process: threads of a shut-down
session outlive it and can touch freed state (ray-project/ray#31145). After ray.shutdown() the core worker's
`worker.io` thread and gRPC pollers were still running here at interpreter exit, and a test process that had
cycled five sessions segfaulted at exit after every test had passed. So mergescale never calls ray.shutdown(): the
session the first merge, evaluation or training run of a process starts serves every later one (which also saves
the 5-6 s that `ray.init` takes per call), and Ray's own exit hook stops it. Call ray.shutdown() yourself to
release an embedded Ray sooner, once you start no more Ray work in that process."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)
# Ray Train's detached placement-group cleaner warns once a second while the State API is slow, which it is on a
# loaded machine: ~1,200 lines in one training run here, and nothing for the user to do about it.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_logs() -> None:
    """Worker process setup hook of the embedded Ray: silence QUIET_LOGGERS below errors."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def ensure_ray(address: str | None = None, **init_kw) -> bool:
    """Use the Ray this process already runs; else connect to `address`, or with none start an embedded local Ray.
    Returns True when this call connected or started it. It is never shut down here (see the module docstring)."""
    if ray.is_initialized():
        if address:
            log.debug("Ray is already initialized in this process; using it, not %s", address)
        return False
    if address:
        ray.init(address=address, **init_kw)
    else:
        # Ray runs its workers at nice 15 by default, so on a shared machine a training run yields to everything
        # else (3.3 s steps became 20 s here). Run them at the driver's priority unless RAY_worker_niceness asks.
        os.environ.setdefault("RAY_worker_niceness", "0")
        env = dict(init_kw.pop("runtime_env", None) or {})
        env.setdefault("worker_process_setup_hook", "mergescale.cluster.session.quiet_worker_logs")
        ray.init(address="local", include_dashboard=False, runtime_env=env, **init_kw)
    return True
