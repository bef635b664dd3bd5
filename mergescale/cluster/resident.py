"""Resident replicas for a study: one Ray actor per base holds the base's model (eval.resident) across cells; a
cell's merge runs inside that actor and is pushed into the model in place (merge.push), then scored there
(study.cells.push_model), so no merged byte crosses a process or touches a disk.

A replica that dies, or whose push fails its checksum, is replaced by a fresh one (a fresh load of the base) and the
cell runs again there (`retry_on_fresh`): a checksum mismatch means the replica's model cannot be trusted. Cells of
one base run one after another on its replica (an actor runs one call at a time); cells of different bases side by
side.
"""

from __future__ import annotations

import logging

import ray

from mergescale.merge.push import PushMismatch

log = logging.getLogger(__name__)


@ray.remote(max_restarts=0)
class ResidentReplica:
    """A resident model of one base (loaded once) that merges cells into itself and scores them."""

    def __init__(self, base_dir: str, settings: dict):
        from mergescale.eval.merge_eval import load_resident
        from mergescale.study.cells import _worker_setup

        _worker_setup(settings)
        self.resident = load_resident(base_dir, settings["backend"], dtype=settings["dtype"],
                                      max_length=settings["max_length"])

    def push_model(self, config: dict, tasks: list[str], out: str, settings: dict) -> dict:
        from mergescale.study.cells import push_model

        return push_model(config, tasks, out, settings, self.resident)


class ResidentPool:
    """The study's resident replicas, one per base directory, started on first use and kept until `close`."""

    def __init__(self, settings: dict, num_cpus: float, num_gpus: float):
        self.settings, self.num_cpus, self.num_gpus = settings, num_cpus, num_gpus
        self.actors: dict[str, object] = {}
        self.started = 0  # replicas started, each a load of its base: the model loads a push study does

    def submit(self, base_dir: str, config: dict, tasks: list[str], out: str, settings: dict):
        """The cell's push_model on the replica of `base_dir` (an ObjectRef)."""
        if base_dir not in self.actors:
            self.actors[base_dir] = ResidentReplica.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus).remote(
                base_dir, self.settings)
            self.started += 1
        return self.actors[base_dir].push_model.remote(config, tasks, out, settings)

    def retry_on_fresh(self, base_dir: str, error: BaseException) -> bool:
        """After a failed cell: True (and the base's replica replaced) when the replica is what failed, its process
        lost or its push's checksum wrong; False for an error of the cell itself (bad input, non-finite scores)."""
        lost = isinstance(error, (ray.exceptions.RayActorError, PushMismatch))
        if lost:
            log.warning("resident replica of %s %s; the cell runs again on a fresh one", base_dir,
                        "failed its checksum" if isinstance(error, PushMismatch) else "was lost")
            actor = self.actors.pop(base_dir, None)
            if actor is not None:
                ray.kill(actor)
        return lost

    def close(self) -> None:
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
