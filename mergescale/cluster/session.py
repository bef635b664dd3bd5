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

import ray

log = logging.getLogger(__name__)


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
        ray.init(address="local", include_dashboard=False, **init_kw)
    return True
