"""Resident replicas for a study: one Ray actor per base holds the base's model (eval.resident) across cells; a
cell's merge runs inside that actor and is pushed into the model in place (merge.push), then scored there
(study.cells.push_model), so no merged byte crosses a process or touches a disk.

A replica that dies, or whose push fails its checksum, is replaced by a fresh one (a fresh load of the base) and the
cell runs again there (`ResidentCall.retry`): a checksum mismatch means the replica's model cannot be trusted. Cells of
one base run one after another on its replica (an actor runs one call at a time); cells of different bases side by
side.
"""

from __future__ import annotations

import logging

import ray

from mergescale.merge.push import PushMismatch

log = logging.getLogger(__name__)


class ResidentReplica:
    """A resident model of one base (loaded once) that merges cells into itself and scores them (a Ray actor)."""

    def __init__(self, base_dir: str, settings: dict):
        from mergescale.eval.merge_eval import load_resident
        from mergescale.study.cells import worker_setup

        worker_setup(settings)
        self.resident = load_resident(base_dir, settings["backend"], dtype=settings["dtype"],
                                      max_length=settings["max_length"])

    def push_model(self, config: dict, tasks: list[str], out: str, settings: dict) -> dict:
        from mergescale.study.cells import push_model

        return push_model(config, tasks, out, settings, self.resident)


class ResidentPool:
    """The study's resident replicas, one per base directory, started on first use and kept until `close`."""

    def __init__(self, settings: dict, num_cpus: float, num_gpus: float, replica: type | None = None):
        self.settings, self.num_cpus, self.num_gpus = settings, num_cpus, num_gpus
        # a replica lost is replaced by the pool (a fresh load), never restarted by Ray under a running cell
        self.replica = ray.remote(max_restarts=0)(replica or ResidentReplica)
        self.actors: dict[str, object] = {}
        self.started = 0  # replicas started, each a load of its base: the model loads a push study does

    def call(self, base_dir: str) -> ResidentCall:
        """A cell's calls on the replica of `base_dir` (a Step's submit and retry)."""
        return ResidentCall(self, base_dir)

    def actor(self, base_dir: str):
        if base_dir not in self.actors:
            self.actors[base_dir] = self.replica.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                base_dir, self.settings)
            self.started += 1
        return self.actors[base_dir]

    def replace(self, base_dir: str, actor, error: BaseException) -> bool:
        """After a failed call on `actor`: True (and the actor replaced, unless another failed call did that
        already) when the replica is what failed, its process lost or its push's checksum wrong; False for an error
        of the cell itself (bad input, non-finite scores), which another replica would repeat."""
        lost = isinstance(error, (ray.exceptions.RayActorError, PushMismatch))
        if lost and self.actors.get(base_dir) is actor:
            log.warning("resident replica of %s %s; its cells run again on a fresh one", base_dir,
                        "failed its checksum" if isinstance(error, PushMismatch) else "was lost")
            del self.actors[base_dir]
            ray.kill(actor)
        return lost

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()


class ResidentCall:
    """One cell's push on its base's replica: `submit` runs it on the current replica, `retry` (after a failure)
    replaces that replica when it is what failed. Cells queued on one replica fail together when it dies; only the
    first of them replaces it, the others run again on its successor."""

    def __init__(self, pool: ResidentPool, base_dir: str):
        self.pool, self.base_dir, self.on = pool, base_dir, None

    def submit(self, config: dict, tasks: list[str], out: str, settings: dict):
        self.on = self.pool.actor(self.base_dir)
        return self.on.push_model.remote(config, tasks, out, settings)

    def retry(self, error: BaseException) -> bool:
        return self.pool.replace(self.base_dir, self.on, error)
