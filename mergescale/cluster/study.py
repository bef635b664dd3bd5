"""The study's runner on Ray: jobs made of steps (a merge, then an evaluation), each step a Ray task.

Ray schedules the tasks on the cluster's resources (a merge task asks for the merge's CPUs/GPUs, an evaluation task
for the evaluation's), so merges and evaluations of different cells run side by side. The only policy here is a
bound: at most `max_in_flight` jobs are started and not finished, which bounds the merged checkpoints alive on disk
(a job's checkpoint exists from its merge until its evaluation ends). Steps are plain functions (mergescale.study
.cells); what a job's next step is, and what to do with results and failures, the caller decides.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)


@dataclass
class Step:
    fn: Callable
    args: tuple
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    name: str = ""
    env: dict | None = None  # environment variables of the task and of what it starts (runtime_env env_vars)
    # run by submit(*args) (e.g. an actor's method; it returns the ObjectRef) instead of as a Ray task of fn
    submit: Callable | None = None
    # after a failure: retry(error) True runs the step again, at most `retries` times
    retry: Callable[[BaseException], bool] | None = None
    retries: int = 1


def error_text(e: BaseException) -> str:
    """The original error of a failed Ray task ('MergeInputError: ...'), not Ray's wrapper and traceback."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        e = cause
    return f"{type(e).__name__}: {e}"


def run_jobs(jobs: list, first_step: Callable, next_step: Callable, on_failure: Callable, *, max_in_flight: int,
             address: str | None = None, on_start: Callable | None = None) -> None:
    """Run every job's steps as Ray tasks, at most max_in_flight jobs at once.

    first_step(job) -> Step | None (None: nothing to do); next_step(job, step, result) -> Step | None (None: the
    job is finished); on_failure(job, step, error_text) when a step raises (or its worker dies twice): the job
    stops, the others go on. on_start(job, step) is called as each step is submitted."""
    import ray

    from mergescale.cluster.session import ensure_ray

    ensure_ray(address)
    remotes: dict = {}

    def submit(job, step: Step, inflight: dict):
        if step.submit is not None:
            ref = step.submit(*step.args)
        else:
            if step.fn not in remotes:
                remotes[step.fn] = ray.remote(step.fn)
            runtime_env = {"runtime_env": {"env_vars": step.env}} if step.env else {}
            # max_retries: a worker lost with its node is retried once; an exception in the step is not
            ref = remotes[step.fn].options(num_cpus=step.num_cpus, num_gpus=step.num_gpus, max_retries=1,
                                           retry_exceptions=False, name=step.name or step.fn.__name__,
                                           **runtime_env).remote(*step.args)
        inflight[ref] = (job, step)
        if on_start is not None:
            on_start(job, step)

    queue, inflight = deque(jobs), {}
    try:
        while queue or inflight:
            while queue and len(inflight) < max_in_flight:
                job = queue.popleft()
                step = first_step(job)
                if step is not None:
                    submit(job, step, inflight)
            if not inflight:
                continue
            (ref,), _ = ray.wait(list(inflight), num_returns=1)
            job, step = inflight.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a failed step fails its job only
                if step.retry is not None and step.retries > 0 and step.retry(e):
                    submit(job, replace(step, retries=step.retries - 1), inflight)
                    continue
                on_failure(job, step, error_text(e))
                continue
            try:
                nxt = next_step(job, step, result)
            except Exception as e:  # noqa: BLE001 - e.g. a non-finite score found while recording the result
                on_failure(job, step, error_text(e))
                continue
            if nxt is not None:
                submit(job, nxt, inflight)
    finally:
        for ref, (_, step) in inflight.items():  # interrupted (Ctrl-C, an error in a callback): stop what still runs
            # an actor's call cannot be force-cancelled (Ray refuses); it stops with its actor, which its owner kills
            ray.cancel(ref, force=step.submit is None)
