"""`train(recipe, config)`: validate everything, then train on Ray and return the manifest of the written model.

Order matters: config, base model, tokenizer, DeepSpeed JSON, data (with the instruct leak check), the output
path and, for a resume, the checkpoint files against their seal are all checked here on the driver, so bad input
fails with a message naming the field or file before any worker starts, any checkpoint is written or any output
directory appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from mergescale.checkpoint.output_dir import check_output
from mergescale.config import ConfigError
from mergescale.models.sources import resolve_model_dir
from mergescale.training.checkpoints import CheckpointMismatch, verified_resume_tag
from mergescale.training.config import TrainConfig, check_recipe, deepspeed_json, load_train_config
from mergescale.training.recipes import prepare_data
from mergescale.training.trainer import STOPPED

log = logging.getLogger(__name__)
RUN_MARKER = "run.json"  # in the work directory: mergescale made it, for the run with this key
# Fields that may change between a crash and its resume without changing the result.
_NOT_IN_RUN_KEY = {"cluster": {"address", "max_failures"}, "checkpoint_every": True, "keep_checkpoints": True}


class TrainingStopped(ConfigError):
    """The workers ended the run without a model: its loss was not finite."""


class TrainingFailed(RuntimeError):
    """The worker group failed more often than cluster.max_failures allows; the checkpoints stay for a rerun."""


def run_key(recipe: str, cfg: TrainConfig, fingerprint: str) -> str:
    d = cfg.model_dump(mode="json", exclude=_NOT_IN_RUN_KEY)
    return hashlib.sha256(json.dumps([recipe, d, fingerprint], sort_keys=True).encode()).hexdigest()


def train(recipe: str, config: TrainConfig | dict | str | Path, *, launch, out: str | Path | None = None,
          overwrite: bool = False, resume: bool = True, progress: bool = True, workers: int | None = None,
          address: str | None = None, keep_checkpoints: bool = False, data_dir: str | None = None,
          task_files: list[str] | None = None) -> dict:
    """Train `recipe` (expert | multitask | instruct) as `config` says; returns the output manifest.

    `launch`: what runs the validated training (mergescale.cluster.train.run_training on Ray Train, which
    mergescale.api.train hands down). A run whose checkpoint directory holds checkpoints of the same run (same
    recipe, config and data) resumes from the newest one; resume=False discards them. After success the
    checkpoints are deleted unless keep_checkpoints."""
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
    model_cfg = _check_base(cfg)
    _check_tokenizer(cfg, model_cfg)
    ds_base = deepspeed_json(cfg.deepspeed)
    sources, val, info = prepare_data(recipe, cfg)
    _check_lengths(cfg, model_cfg)
    check_output(out, overwrite)

    work = cfg.work_dir(out)
    key = run_key(recipe, cfg, info["fingerprint"])
    marker = work / RUN_MARKER
    if work.exists():
        if not marker.exists() and any(work.iterdir()):
            raise ConfigError(f"checkpoint_dir: {work} holds files mergescale did not write (no {RUN_MARKER}); it is "
                              "neither deleted nor resumed from. Choose another checkpoint_dir, or empty it")
        same = marker.exists() and _run_key_of(marker) == key
        if same and resume:
            try:
                tag = verified_resume_tag(work / "checkpoints", info["fingerprint"])
            except CheckpointMismatch as e:
                raise ConfigError(f"resume: {e}") from None
            if tag is not None:
                log.info("resuming from %s (every file matches the sha256 recorded when it was saved)", tag)
        else:
            if not same and any(work.iterdir()) and resume:
                log.warning("%s holds checkpoints of a different run (config or data changed); starting over", work)
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / STOPPED).unlink(missing_ok=True)
    marker.write_text(json.dumps({"run_key": key, "recipe": recipe, "out": str(out)}))

    manifest = launch(recipe, cfg, sources, val, info, ds_base, out, work, progress=progress, overwrite=overwrite)
    if manifest is None:  # the workers stopped the run: a non-finite loss
        why = json.loads((work / STOPPED).read_text())["error"]
        raise TrainingStopped(f"{why} (recipe {recipe}, base {cfg.base}): the base model holds NaN/inf values, or "
                              "the run diverged (lower lr, set grad_clip). No model was written; the checkpoints "
                              f"before that step are kept in {work / 'checkpoints'}")
    if not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def _run_key_of(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):  # unreadable: ours (it is named so) but not this run's
        return None


def _check_base(cfg: TrainConfig) -> dict:
    """The base opens as a model directory (safetensors, or pickle only with allow_pickle, as merges do); its
    config.json."""
    from mergescale.checkpoint.read import Checkpoint, CheckpointError

    try:
        with Checkpoint(cfg.base, allow_pickle=cfg.allow_pickle) as ck:
            return ck.config
    except CheckpointError as e:
        raise ConfigError(f"base: {e}") from None


def _check_tokenizer(cfg: TrainConfig, model_cfg: dict) -> None:
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:  # noqa: BLE001 - missing files, bad JSON
        field = "tokenizer" if cfg.tokenizer else "base"
        raise ConfigError(f"{field}: cannot load a tokenizer from {src}: {e}") from None
    if tok.pad_token_id is None and tok.eos_token_id is None:
        raise ConfigError(f"tokenizer {src}: needs a pad or an EOS token to pad batches")
    rows = model_cfg.get("vocab_size")
    if rows is not None and len(tok) > rows:  # ids past the embedding: an index error inside the workers
        raise ConfigError(f"{'tokenizer' if cfg.tokenizer else 'base'}: the tokenizer at {src} has {len(tok)} tokens "
                          f"but the base model's embedding has {rows} rows; it does not belong to this model")


def _check_lengths(cfg: TrainConfig, model_cfg: dict) -> None:
    from mergescale.eval.backends import model_positions

    positions = model_positions(model_cfg)
    if positions is not None and cfg.max_input_len + cfg.max_output_len > positions:
        # learned position embeddings fail inside the workers; rotary ones run on positions never trained
        raise ConfigError(f"max_input_len ({cfg.max_input_len}) + max_output_len ({cfg.max_output_len}) exceed the "
                          f"base model's {positions} positions (max_position_embeddings in its config.json)")
