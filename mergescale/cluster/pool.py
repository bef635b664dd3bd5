"""The merge actors of a distributed merge: placed in a placement group, fed batches of units, replaced when
they die (cluster/merge.py is the driver that uses them, cluster/worker.py what each actor does).

Nothing here imports torch, so that a driver can create its actors before it has loaded anything heavy: each
actor loads numba, the method's compiled kernels and, when the method needs it, torch as it starts.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from mergescale.checkpoint.read import stored_float_dtype
from mergescale.config import MergeConfig
from mergescale.merge.methods import METHODS

log = logging.getLogger(__name__)
BATCH_BYTES = 256 * 10**6  # input bytes per call: small enough for a live progress bar and cheap retries
# How long actors may take to set up, and the longest a merge may go without any actor finishing a batch. Setup
# includes the first merge of a fresh install, where every actor compiles the fused kernels before numba's cache
# has them: ~70 s of CPU per process here, and two actors on 2 busy cores went past the 120 s this used to be.
ACTOR_START_TIMEOUT_S = 600.0


class MergeActor:
    """The Ray actor. Starting one loads numba, the method's compiled kernels and, if the method needs it, torch
    (worker.start_process); `setup` then gives it the validated config and the output, and it works as a
    MergeWorker (cluster/worker.py). Defined here, in a module without torch, so that the driver can create it
    before loading anything heavy."""

    def __init__(self, method: str, n_experts: int, use_gpu: bool, kernels_merge: bool, selection: bool,
                 stored: str | None, out_dtype: str | None):
        from mergescale.cluster import worker

        worker.start_process(method, n_experts, use_gpu, kernels_merge, selection, stored, out_dtype)
        self._worker_cls, self.worker = worker.MergeWorker, None

    def setup(self, config_json: dict, out: str, layout_fingerprint: str, key: str, use_gpu: bool,
              stats_json: dict | None = None) -> dict:
        self.worker = self._worker_cls(config_json, out, layout_fingerprint, key, use_gpu)
        if stats_json is not None:  # a replacement actor joining after the statistics pass
            self.worker.set_stats(stats_json)
        return self.worker.info()

    def selection(self, unit_ids, windows, next_unit=None):
        return self.worker.selection(unit_ids, windows, next_unit)

    def row_stats(self, unit_ids, next_unit=None):
        return self.worker.row_stats(unit_ids, next_unit)

    def sample_windows(self) -> dict:
        return self.worker.sample_windows()

    def set_stats(self, stats_json: dict) -> None:
        self.worker.set_stats(stats_json)

    def merge(self, unit_ids, next_unit=None, hashed=()) -> dict:
        return self.worker.merge(unit_ids, next_unit, hashed)

    def merge_rows(self, unit_ids, next_unit=None, hashed=()) -> dict:
        return self.worker.merge_rows(unit_ids, next_unit, hashed)

    def verify(self, unit_ids, next_unit=None) -> dict:
        return self.worker.verify(unit_ids, next_unit)

    def flush(self) -> list[int]:
        return self.worker.flush()


@dataclass
class _Slot:
    """An actor, its queue of batches, and what it is doing: `busy` (a call in flight) or `starting` (a
    replacement actor's first call, which resolves once it is placed and has opened the inputs)."""

    index: int
    actor: object
    queue: deque = field(default_factory=deque)
    busy: object = None
    batch: list[int] | None = None
    starting: object = None
    bytes: int = 0
    seconds: float = 0.0
    units: int = 0
    node: str | None = None
    device: str | None = None
    torch: bool = False  # whether the actor loaded torch (GPU, statistics, or a unit the kernels could not merge)
    unsynced: list[int] = field(default_factory=list)  # merged and written, not yet reported durable


def balanced_batches(units: list, unit_bytes: dict[int, int], k: int) -> list[deque]:
    """Split units into k queues of batches with nearly equal bytes (largest first onto the lightest queue),
    keeping each queue in file order so actors read sequentially."""
    loads, assigned = [0] * k, [[] for _ in range(k)]
    for u in sorted(units, key=lambda u: -unit_bytes[u.id]):
        i = min(range(k), key=lambda j: loads[j])
        assigned[i].append(u)
        loads[i] += unit_bytes[u.id]
    queues = []
    for mine in assigned:
        mine.sort(key=lambda u: u.id)
        # At least ~8 batches per actor even for small models: progress, journaling and retries stay fine-grained.
        max_units = max(1, -(-len(mine) // 8))
        q, batch, size = deque(), [], 0
        for u in mine:
            if batch and (size + unit_bytes[u.id] > BATCH_BYTES or len(batch) >= max_units):
                q.append(batch)
                batch, size = [], 0
            batch.append(u.id)
            size += unit_bytes[u.id]
        if batch:
            q.append(batch)
        queues.append(q)
    return queues


_ACTOR_DIED = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
               ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)


def _cause(e: Exception) -> Exception:
    """The error an actor's method raised (a MergeInputError naming a file, an OSError from fdatasync), not
    Ray's RayTaskError wrapper around it."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, Exception) else e


class ActorPool:
    """K merge actors in a placement group; dead actors are replaced, idle actors steal queued batches.

    Made in two steps so that the actors start (seconds of imports each) while the driver validates: creating the
    pool requests the placement group and the actors and returns at once; `start` waits for them and hands them
    the validated config and the output."""

    def __init__(self, config: MergeConfig, workers: int):
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.spec = config.cluster
        self.workers, self.use_gpu = workers, spec.num_gpus > 0
        # whether the actors can merge with the fused kernels alone, and so skip torch; and whether they find
        # thresholds (so load those kernels too)
        method = METHODS[config.method]
        kernels_merge = method.kernels_merge()
        selection = not method.kernels_alone(config.method_params)
        # which compiled kernels the actors load: the stored dtype from one header (a hint, None if unknown yet)
        stored = stored_float_dtype(config.base or config.experts[0].path)
        self.init_args = (config.method, len(config.experts), self.use_gpu, kernels_merge, selection, stored,
                          config.out_dtype)
        self.args = None  # setup's arguments, once the driver has validated the inputs
        self.bundle = {"CPU": spec.num_cpus, **({"GPU": spec.num_gpus} if spec.num_gpus else {})}
        have = ray.cluster_resources()
        if any(have.get(r, 0) < n * workers for r, n in self.bundle.items()):
            log.warning("the cluster has %s now; %d workers of %s need more: waiting up to %.0f s for "
                        "resources (autoscaling)", have, workers, self.bundle, spec.placement_timeout_s)
        self.pg = placement_group([self.bundle] * workers, strategy=spec.placement)
        self.remote_cls = ray.remote(MergeActor)
        self.resources = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus}
        self.name_prefix = f"mergescale-merge-{uuid.uuid4().hex[:10]}"  # named so operators (and tests) can find them
        self.slots = [
            _Slot(i, self.remote_cls.options(
                **self.resources,
                name=f"{self.name_prefix}-{i}",
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(*self.init_args))
            for i in range(workers)
        ]
        self.replacements = 0
        self.stats_ref = None  # once set, every replacement actor gets the statistics before any merge work

    def start(self, config: MergeConfig, out: Path | None, layout_fingerprint: str, key: str) -> None:
        """Wait for the actors and set them up; `out` None: they return merged rows (merge_rows), writing none."""
        from mergescale.errors import MergeInputError

        ready, _ = ray.wait([self.pg.ready()], timeout=self.spec.placement_timeout_s)
        if not ready:
            raise MergeInputError(
                f"cannot place {self.workers} merge workers of {self.bundle} ({self.spec.placement}) on this cluster "
                f"(resources: {ray.cluster_resources()}); lower cluster.workers, num_cpus or num_gpus"
            )
        self.args = (config.model_dump(mode="json", by_alias=True), None if out is None else str(out),
                     layout_fingerprint, key, self.use_gpu)
        try:
            infos = ray.get([s.actor.setup.remote(*self.args) for s in self.slots], timeout=ACTOR_START_TIMEOUT_S)
        except ray.exceptions.RayTaskError as e:  # e.g. an actor's node sees other input files: that error, as is
            raise _cause(e) from None
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"{self.workers} merge workers did not finish setting up in {ACTOR_START_TIMEOUT_S:.0f} s (opening the "
                "inputs and loading or compiling the fused kernels); see the actors' logs in the Ray dashboard"
            ) from None
        for s, info in zip(self.slots, infos):
            s.node = info["node"]

    def _replace(self, slot: _Slot) -> None:
        """A fresh actor for a dead one, scheduled anywhere (its bundle may have died with its node)."""
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.replacements += 1
        name = f"{self.name_prefix}-{slot.index}-r{self.replacements}"
        slot.actor = self.remote_cls.options(**self.resources, name=name).remote(*self.init_args)
        slot.starting = slot.actor.setup.remote(*self.args, self.stats_ref)
        slot.node = None

    def sample_windows(self) -> dict:
        """{(stream, tag): first counting window} of the threshold queries, from one actor's sample of rows (the
        coordinator loads no torch to read and sort one). {} if that actor died meanwhile: the passes then start
        from the whole range, a pass more and exact all the same; `run` replaces the actor."""
        try:
            return ray.get(self.slots[0].actor.sample_windows.remote(), timeout=ACTOR_START_TIMEOUT_S)
        except _ACTOR_DIED as e:
            log.warning("merge worker 0 died (%s) while sampling; thresholds start from the whole range",
                        type(e).__name__)
            return {}
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None

    def set_stats(self, stats_json: dict) -> None:
        self.stats_ref = ray.put(stats_json)
        ray.get([s.actor.set_stats.remote(self.stats_ref) for s in self.slots])

    def run(self, method: str, queues: list[deque], make_args, on_result, max_failures: int) -> None:
        """Call `method(*make_args(batch, first unit of the actor's next batch or None))` on every batch, one call in
        flight per actor; on_result(slot, batch, result).

        A batch whose actor died goes back to the front of that slot's queue (idle actors may steal it) and
        the actor is replaced. Errors raised by the merge code itself (bad data) propagate."""
        for slot, q in zip(self.slots, queues):
            slot.queue = q
        failures = 0

        def dispatch(slot):
            if slot.busy is None and slot.starting is None:
                batch = slot.queue.popleft() if slot.queue else self._steal()
                if batch is not None:
                    upcoming = slot.queue[0][0] if slot.queue else None  # a read-ahead hint for the actor
                    slot.batch, slot.busy = batch, getattr(slot.actor, method).remote(*make_args(batch, upcoming))

        while True:
            for slot in self.slots:
                dispatch(slot)
            waiting = {s.busy: s for s in self.slots if s.busy is not None}
            if not waiting and not any(s.queue for s in self.slots):
                return
            waiting.update({s.starting: s for s in self.slots if s.starting is not None})
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=ACTOR_START_TIMEOUT_S)
            if not done:
                raise RuntimeError(f"no merge worker made progress in {ACTOR_START_TIMEOUT_S:.0f} s")
            slot = waiting[done[0]]
            is_start = slot.starting is not None
            batch = slot.batch
            if is_start:
                slot.starting = None
            else:
                slot.busy, slot.batch = None, None
            try:
                result = ray.get(done[0])
            except _ACTOR_DIED as e:
                failures += 1
                if failures > max_failures:
                    raise RuntimeError(f"merge workers failed {failures} times; last: {e}") from e
                log.warning("merge worker %d died (%s)%s; replacing it", slot.index, type(e).__name__,
                            "" if is_start else f"; its batch of {len(batch)} units is redone")
                if not is_start:
                    slot.queue.appendleft(batch)
                self._requeue_unsynced(slot)
                self._replace(slot)
                continue
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
            dispatch(slot)  # the actor's next batch first: it works while on_result journals (an fsync) this one
            if not is_start:
                on_result(slot, batch, result)

    def _requeue_unsynced(self, slot: _Slot) -> None:
        """A dead actor's rows that were written but whose fdatasync it never confirmed may be lost (with its
        node's page cache): merge them again."""
        if slot.unsynced:
            slot.queue.appendleft(slot.unsynced)
            slot.unsynced = []

    def flush(self) -> list[int]:
        """Wait for every actor's last fdatasync; returns the units it made durable. The unconfirmed units of an
        actor that died meanwhile go back to its queue (run the merge again while any queue is not empty)."""
        pending = {s.actor.flush.remote(): s for s in self.slots if s.unsynced}
        durable = []
        for ref, slot in pending.items():
            try:
                ray.get(ref)
                durable += slot.unsynced
                slot.unsynced = []
            except _ACTOR_DIED as e:
                log.warning("merge worker %d died (%s) before its last rows were durable; they are redone",
                            slot.index, type(e).__name__)
                self._requeue_unsynced(slot)
                self._replace(slot)
            except ray.exceptions.RayTaskError as e:  # the fdatasync itself failed (EIO, ENOSPC): say so
                raise _cause(e) from None
        return durable

    def _steal(self) -> list[int] | None:
        donor = max(self.slots, key=lambda s: len(s.queue))
        return donor.queue.pop() if donor.queue else None

    def shutdown(self, wait: bool = False) -> None:
        """Kill the actors. wait=True returns only once each is gone (ray.kill does not wait): a merge that starts
        over in a new partial output at the same path must not have an old actor still writing into it."""
        for s in self.slots:
            try:
                ray.kill(s.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        deadline = time.time() + ACTOR_START_TIMEOUT_S
        for s in self.slots if wait else ():
            while True:
                try:
                    ray.get(s.actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.time()))
                except (*_ACTOR_DIED, ray.exceptions.RayTaskError):
                    break
                except ray.exceptions.GetTimeoutError:
                    stuck = f"merge worker {s.index} did not stop in {ACTOR_START_TIMEOUT_S:.0f} s"
                    raise RuntimeError(stuck) from None
                time.sleep(0.05)
        ray.util.remove_placement_group(self.pg)
