"""The embedded local Ray: workers at the driver's priority (Ray's default is nice 15), and no job-wide runtime
environment, which would make every worker wait for Ray's runtime-env agent; the workers see that this Ray has no
State API (cluster/train.py leaves out Ray Train's cleaner, which needs it), and it keeps a few idle workers more
than its CPUs (its raylet was started with that setting: the effect is in docs/BENCHMARKS.md)."""

from __future__ import annotations

import os

import ray

from mergescale.cluster.session import IDLE_WORKERS_OVER_CPUS, NO_STATE_API_ENV, ensure_ray


@ray.remote(num_cpus=0)
def _worker_state():
    return os.nice(0), os.environ.get(NO_STATE_API_ENV), os.environ.get("RAY_num_workers_soft_limit")


def test_embedded_ray_workers_keep_priority_and_know_there_is_no_state_api():
    assert ensure_ray(num_cpus=1) is True
    niceness, no_state_api, soft_limit = ray.get(_worker_state.remote())
    assert niceness == os.nice(0)  # not lowered
    assert no_state_api == "1"
    assert soft_limit == str(1 + IDLE_WORKERS_OVER_CPUS)
    assert not ray.get_runtime_context().runtime_env  # no job-wide runtime environment
