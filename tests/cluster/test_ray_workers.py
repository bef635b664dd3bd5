"""The embedded local Ray: workers at the driver's priority (Ray's default is nice 15) and Ray Train's
placement-group cleaner quiet below errors in every worker."""

from __future__ import annotations

import logging
import os

import ray

from mergescale.cluster.session import QUIET_LOGGERS, ensure_ray


@ray.remote(num_cpus=0)
def _worker_state():
    return os.nice(0), [logging.getLogger(n).getEffectiveLevel() for n in QUIET_LOGGERS]


def test_embedded_ray_workers_keep_priority_and_are_quiet():
    assert ensure_ray(num_cpus=1) is True
    niceness, levels = ray.get(_worker_state.remote())
    assert niceness == os.nice(0)  # not lowered
    assert levels == [logging.ERROR] * len(QUIET_LOGGERS)
