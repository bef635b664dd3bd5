"""K evaluation replicas (hf or vllm backend) as Ray actors.

Chunks of length-sorted work are assigned to replicas greedily by token cost (longest first, to the least
loaded replica), so replicas finish together; each replica keeps two chunks in flight so it never idles
while the driver writes results. vLLM inside an actor runs its own in-process executor
(distributed_executor_backend="uni", set in VLLMBackend), never a nested Ray executor.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def balance(costs: list[int], k: int) -> list[list[int]]:
    """Indices of `costs` split into k lists with near-equal sums (LPT greedy)."""
    loads = [0] * k
    out: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(k), key=lambda r: loads[r])
        out[r].append(i)
        loads[r] += costs[i]
    return out


def _replica_class(ray):
    @ray.remote
    class EvalReplica:
        def __init__(self, backend: str, model_dir: str, kw: dict):
            from mergescale.eval.backends import make_backend

            self.engine = make_backend(backend, model_dir, **kw)

        def run(self, kind: str, requests: list) -> list:
            from mergescale.eval.runner import run_chunk

            return run_chunk(self.engine, kind, requests)

    return EvalReplica


def run_on_replicas(chunks, on_done, backend: str, model_dir, backend_kw: dict, replicas: int = 2,
                    address: str | None = None, num_cpus: float = 1.0, num_gpus: float = 0.0, bar=None,
                    in_flight: int = 2) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from mergescale.cluster.session import ensure_ray
    from mergescale.eval.backends import EvalError

    ensure_ray(address, log_to_driver=False)
    actors, pg = [], None
    try:
        env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_", "TRANSFORMERS_"))}
        # a replica lost with its node is restarted and its in-flight chunks retried (results are idempotent)
        cls = _replica_class(ray)
        opts = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=2, max_task_retries=2,
                    runtime_env={"env_vars": env} if env else None)
        kw = dict(backend_kw)
        if num_gpus > 0 and not kw.get("device"):
            kw["device"] = "cuda"
        # All replicas of an evaluation are placed at once (a placement group is all or nothing): evaluations that
        # run side by side (a study's cells) would otherwise each hold some replicas and wait forever for the rest.
        bundle = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
        if bundle:
            have = ray.cluster_resources()
            short = {k: v * replicas for k, v in bundle.items() if v * replicas > have.get(k, 0)}
            if short:
                free = {k: have.get(k, 0) for k in short}
                raise EvalError(f"{replicas} evaluation replicas need {short}; the Ray cluster has {free}: "
                                "lower --replicas or the resources per replica")
            pg = placement_group([bundle] * replicas, strategy="SPREAD")
            ray.get(pg.ready())  # queued behind other evaluations' replicas until the cluster has room
        for i in range(replicas):
            where = {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)} \
                if pg is not None else {}
            actors.append(cls.options(**opts, **where).remote(backend, str(model_dir), kw))
        queues = [[chunks[i] for i in idx] for idx in balance([c.cost for c in chunks], replicas)]
        pending: dict = {}

        def submit(r: int):
            if queues[r]:
                c = queues[r].pop(0)
                pending[actors[r].run.remote(c.kind, [i.request for i in c.items])] = (r, c)

        for r in range(replicas):
            for _ in range(in_flight):
                submit(r)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            r, c = pending.pop(done[0])
            results = ray.get(done[0])
            submit(r)
            on_done(c, results)
            if bar is not None:
                bar.update(len(c.items))
    finally:
        for a in actors:  # the session stays up for later work (cluster/session.py); the replicas do not
            ray.kill(a)
        if pg is not None:
            remove_placement_group(pg)
