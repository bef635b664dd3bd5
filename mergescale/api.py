"""The Python API: merge, evaluate and train, each choosing who does the work (this process, or Ray) and handing
that down. The layers below take what runs them as an argument and never import mergescale.cluster, where
everything Ray lives; only this module and the command lines (which call it) reach into it.

    mergescale.merge(config, out, workers=K)            (mergescale.merge is callable: see mergescale/__init__.py)
    mergescale.eval.evaluate(model_dir, replicas=K)     (the eval package hands its calls here)
    mergescale.training.train(recipe, config)           (the training package hands its calls here)
"""

from __future__ import annotations

from pathlib import Path


def merge(config, out: str | Path | None = None, *, workers: int | None = None, address: str | None = None,
          overwrite: bool = False, progress: bool = True, resume: bool = True, dry_run: bool = False) -> dict:
    """Merge the experts described by `config` (a MergeConfig, a dict or a YAML path) into `out`.

    With `workers=None` (and no `address`) this process merges; with `workers=K` the merge is spread over K Ray
    actors (an embedded local Ray unless `address` is given or Ray is already initialized). Blocks and returns
    the manifest dict (with dry_run: {"dry_run": True, "description": the plan}). For a non-blocking form inside a
    Ray program see `mergescale.cluster.merge.merge_async`."""
    from mergescale.merge.driver import run_merge

    runner = None
    if workers is not None or address is not None:
        from mergescale.cluster.merge import RayRunner

        runner = RayRunner(workers, address)
    return run_merge(config, out, runner=runner, overwrite=overwrite, progress=progress, resume=resume,
                     dry_run=dry_run)


def evaluate(model_dir, *, replicas: int = 1, address: str | None = None, engine=None, **kwargs) -> dict:
    """Evaluate a model (see mergescale.eval.runner.evaluate for the arguments): in this process, or on `replicas`
    Ray actors when replicas > 1 or an `address` is given."""
    from mergescale.eval.runner import evaluate as run

    on_replicas = None
    if engine is None and (replicas > 1 or address is not None):
        from mergescale.cluster.eval_replicas import run_on_replicas as on_replicas
    return run(model_dir, replicas=replicas, address=address, engine=engine, run_on_replicas=on_replicas, **kwargs)


def merge_eval(config, resident, *, workers: int | None = None, address: str | None = None, **kwargs) -> dict:
    """Merge `config` into `resident` (a model loaded once: mergescale.eval.merge_eval.load_resident) and evaluate
    it there, nothing written but the results (see mergescale.eval.merge_eval.evaluate_merge). With `workers=K` (or
    an `address`) K Ray merge actors merge it and send their rows to this process; else this process merges."""
    from mergescale.eval.merge_eval import evaluate_merge

    runner = None
    if workers is not None or address is not None:
        from mergescale.cluster.merge import RayPushRunner

        runner = RayPushRunner(workers, address)
    return evaluate_merge(config, resident, runner=runner, **kwargs)


def train(recipe: str, config, **kwargs) -> dict:
    """Train `recipe` (expert | multitask | instruct) with `config` on Ray Train (see mergescale.training.api.train
    for the arguments)."""
    from mergescale.cluster import train as cluster_train
    from mergescale.training.api import train as run

    return run(recipe, config, launch=cluster_train.run_training, **kwargs)
