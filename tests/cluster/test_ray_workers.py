"""The embedded local Ray: workers at the driver's priority (Ray's default is nice 15), and no job-wide runtime
environment, which would make every worker wait for Ray's runtime-env agent; the workers see that this Ray has no
State API (cluster/train.py leaves out Ray Train's cleaner, which needs it)."""

from __future__ import annotations

import os

import ray

from mergescale.cluster.session import NO_STATE_API_ENV, ensure_ray


@ray.remote(num_cpus=0)
def _worker_state():
    return os.nice(0), os.environ.get(NO_STATE_API_ENV)


def test_embedded_ray_workers_keep_priority_and_know_there_is_no_state_api():
    assert ensure_ray(num_cpus=1) is True
    niceness, no_state_api = ray.get(_worker_state.remote())
    assert niceness == os.nice(0)  # not lowered
    assert no_state_api == "1"
    assert not ray.get_runtime_context().runtime_env  # no job-wide runtime environment
