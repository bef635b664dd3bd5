"""Launching the trainer on Ray Train: a TorchTrainer with N workers (gloo on CPU, NCCL on GPUs).

The driver has already validated the config and loaded the data (mergescale.training.api); the examples travel to
the workers through the object store, so worker nodes need the model and output paths (shared storage) but not
the task data. Ray Train restarts a failed worker group up to cluster.max_failures times; the loop then resumes
from the newest DeepSpeed checkpoint in the run's checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from mergescale.checkpoint.output_dir import MANIFEST
from mergescale.eval.results import write_json_atomic
from mergescale.training.api import TrainingFailed
from mergescale.training.config import TrainConfig
from mergescale.training.trainer import FAIL_ENV, STOPPED

log = logging.getLogger(__name__)
# In the run's work directory: the placement group of the attempt running now, written by its rank-0 worker.
PLACEMENT_GROUP = "placement_group.json"


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train.torch

    from mergescale.training.trainer import run_worker

    sources, val = ray.get(loop_config["data"])
    cfg = TrainConfig.model_validate(loop_config["config"])
    pg = ray.util.get_current_placement_group()
    if pg is not None and ray.train.get_context().get_world_rank() == 0:
        write_json_atomic({"id": pg.id.hex()}, Path(loop_config["work"]) / PLACEMENT_GROUP)
    run_worker(loop_config["recipe"], cfg, sources, val, loop_config["info"], loop_config["deepspeed"],
               Path(loop_config["out"]), Path(loop_config["work"]), ray.train.torch.get_device(),
               loop_config["progress"], loop_config["overwrite"], fail_at=loop_config["fail_at"])


def remove_left_placement_group(work: Path) -> None:
    """Remove the placement group an earlier attempt of this training recorded, if it still holds its resources.

    Ray Train removes a run's group when the run ends, and a detached cleaner actor does when the Train controller
    dies. But Ray's OOM killer can take the driver, the controller and the cleaner at once (it did here, with other
    work on the machine): the group then holds its CPUs until the job ends, and the retried training waits for
    them forever. The same training cannot be running beside its own retry, so its old group is free to remove."""
    import ray
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    record = work / PLACEMENT_GROUP
    if not record.exists():
        return
    pg_id = json.loads(record.read_text())["id"]
    state = placement_group_table().get(pg_id, {}).get("state")
    if state not in (None, "REMOVED"):
        log.warning("removing placement group %s (%s) left by an earlier attempt of this training", pg_id, state)
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    record.unlink()


def _trainer_class(torch_trainer: type) -> type:
    """TorchTrainer, without Ray Train's placement-group cleaner on a Ray without the State API (the embedded one,
    cluster/session.py). The cleaner is a detached actor that asks the State API whether the training's controller
    is still alive: without it every question fails, with a warning each second (~1,200 lines in one training run
    here) and no cleanup ever. A placement group left by a killed training is removed by the next attempt instead
    (remove_left_placement_group)."""
    from mergescale.cluster.session import NO_STATE_API_ENV

    if not os.environ.get(NO_STATE_API_ENV):
        return torch_trainer
    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:  # another Ray Train: its own defaults
        return torch_trainer

    class Trainer(torch_trainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return Trainer


def run_training(recipe: str, cfg: TrainConfig, sources, val, info: dict, ds_base: dict, out: Path, work: Path, *,
                 progress: bool = True, overwrite: bool = False) -> dict | None:
    """Run the trainer on Ray (connecting to cluster.address, or an embedded local Ray) and return the manifest."""
    import ray
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from mergescale.cluster.session import ensure_ray

    ensure_ray(cfg.cluster.address)
    remove_left_placement_group(work)
    use_gpu = cfg.cluster.use_gpu
    resources = {"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    loop_config = {
        "recipe": recipe, "config": cfg.model_dump(mode="json"), "data": ray.put((sources, val)), "info": info,
        "deepspeed": ds_base, "out": str(out), "work": str(work), "progress": progress, "overwrite": overwrite,
        "fail_at": int(os.environ.get(FAIL_ENV, "0") or 0),  # the driver's env does not reach the workers
    }
    trainer = _trainer_class(TorchTrainer)(
        _train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.cluster.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{out.name}-{int(time.time())}", storage_path=str(work / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures)),
    )
    # Train V2 reports no metrics without a Ray checkpoint: the result is the manifest rank 0 wrote (None: the
    # workers stopped the run and said why in work/STOPPED).
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(
            f"training failed after {cfg.cluster.max_failures} restart(s): {str(e)[:2000]}\n"
            f"Checkpoints are kept in {work / 'checkpoints'}; rerun the same command to resume.") from None
    if (work / STOPPED).exists():
        return None
    return json.loads((out / MANIFEST).read_text())
