"""`train(recipe, config)`: validate everything, then train on Ray and return the manifest of the written model.

Order matters: config, base model, tokenizer, DeepSpeed JSON, data (with the instruct leak check) and the output
path are all checked here on the driver, so bad input fails with a message naming the field or file before any
worker starts, any checkpoint is written or any output directory appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from mergescale.config import ConfigError
from mergescale.merge.checkpoint import resolve_model_dir
from mergescale.merge.inputs import check_output
from mergescale.training.config import TrainConfig, check_recipe, deepspeed_json, load_train_config
from mergescale.training.recipes import prepare_data

log = logging.getLogger(__name__)
# Fields that may change between a crash and its resume without changing the result.
_NOT_IN_RUN_KEY = {"cluster": {"address", "max_failures"}, "checkpoint_every": True, "keep_checkpoints": True}


def run_key(recipe: str, cfg: TrainConfig, fingerprint: str) -> str:
    d = cfg.model_dump(mode="json", exclude=_NOT_IN_RUN_KEY)
    return hashlib.sha256(json.dumps([recipe, d, fingerprint], sort_keys=True).encode()).hexdigest()


def train(recipe: str, config: TrainConfig | dict | str | Path, *, out: str | Path | None = None, overwrite: bool = False,
          resume: bool = True, progress: bool = True, workers: int | None = None, address: str | None = None,
          keep_checkpoints: bool = False, data_dir: str | None = None, task_files: list[str] | None = None) -> dict:
    """Train `recipe` (expert | multitask | instruct) as `config` says; returns the output manifest.

    A run whose checkpoint directory holds checkpoints of the same run (same recipe, config and data) resumes
    from the newest one; resume=False discards them. After success the checkpoints are deleted unless
    keep_checkpoints."""
    cfg = load_train_config(config, out=str(out) if out is not None else None, workers=workers, address=address,
                            data_dir=data_dir, task_files=task_files or None)
    check_recipe(recipe, cfg)
    if cfg.out is None:
        raise ConfigError("out: no output directory; set 'out' in the config or pass --out DIR")
    out = Path(cfg.out).resolve()
    # Workers run in other directories (and on other nodes): every path they open must be absolute.
    updates = {"out": str(out)}
    for field in ("base", "tokenizer"):
        if getattr(cfg, field):
            try:
                updates[field] = str(resolve_model_dir(getattr(cfg, field)).resolve())
            except Exception as e:  # noqa: BLE001 - CheckpointError: missing dir, offline hub
                raise ConfigError(f"{field}: {e}") from None
    if cfg.checkpoint_dir:
        updates["checkpoint_dir"] = str(Path(cfg.checkpoint_dir).resolve())
    cfg = cfg.model_copy(update=updates)
    _check_tokenizer(cfg)
    ds_base = deepspeed_json(cfg.deepspeed)
    sources, val, info = prepare_data(recipe, cfg)
    check_output(out, overwrite)

    work = cfg.work_dir(out)
    key = run_key(recipe, cfg, info["fingerprint"])
    marker = work / "run.json"
    if work.exists():
        same = marker.exists() and json.loads(marker.read_text()).get("run_key") == key
        if not (same and resume):
            if not same and any(work.iterdir()) and resume:
                log.warning("%s holds checkpoints of a different run (config or data changed); starting over", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run_key": key, "recipe": recipe, "out": str(out)}))

    from mergescale.cluster.train import run_training  # Ray lives under mergescale/cluster only

    manifest = run_training(recipe, cfg, sources, val, info, ds_base, out, work, progress=progress, overwrite=overwrite)
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _check_tokenizer(cfg: TrainConfig) -> None:
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - missing files, bad JSON
        raise ConfigError(f"{'tokenizer' if cfg.tokenizer else 'base'}: cannot load a tokenizer from {src}: {e}") from None
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {src}: needs a pad or an EOS token to pad batches")
