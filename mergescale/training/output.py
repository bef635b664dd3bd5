"""Writing the trained model: a Hugging Face directory (safetensors, config, tokenizer, manifest, metrics.jsonl),
committed atomically with the merge writer (hidden sibling directory, fsync, rename)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from mergescale.checkpoint.layout import OutputLayout
from mergescale.checkpoint.read import Checkpoint, CheckpointError, safetensors_dtype
from mergescale.checkpoint.write import PartialOutput, fsync_path

METRICS = "metrics.jsonl"


def select_tensors(state_dict: dict[str, torch.Tensor], base: str) -> dict[str, torch.Tensor]:
    """The tensors the base checkpoint stores, in its order: tied duplicates (lm_head tied to the embeddings) are
    dropped as save_pretrained drops them, so `mergescale merge` sees the same names in base and expert."""
    try:
        with Checkpoint(base) as ck:
            names = list(ck.tensors)
    except CheckpointError:
        return state_dict  # base stored some other way (pickle): keep everything
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise CheckpointError(f"{base}: trained model lacks tensors the base stores: {missing[:5]}")
    return {n: state_dict[n] for n in names}


def write_model(state_dict: dict[str, torch.Tensor], out: Path, *, base: str, tokenizer, manifest: dict,
                metrics: Path | None, shard_size: int, overwrite: bool) -> dict:
    """Write out/ atomically; returns the manifest as written (with shard digests)."""
    tensors = select_tensors(state_dict, base)
    layout = OutputLayout.plan([(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
                               shard_size)
    partial = PartialOutput(out, layout, run_key=manifest["data"]["fingerprint"])
    partial.open(resume=False)
    try:
        for name, t in tensors.items():
            partial.write_rows(name, 0, t)
        if metrics is not None and metrics.exists():
            shutil.copyfile(metrics, partial.dir / METRICS)
            fsync_path(partial.dir / METRICS)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.meta-") as meta:
            # config.json as the base has it (training-only settings such as dropout stay out); the tokenizer as
            # the run used it (it may come from another directory than the base).
            for fname in ("config.json", "generation_config.json"):
                if (Path(base) / fname).exists():
                    shutil.copyfile(Path(base) / fname, Path(meta) / fname)
            tokenizer.save_pretrained(meta)
            dtype = next(iter(tensors.values())).dtype
            updates = {"dtype": str(dtype).removeprefix("torch.")}
            return partial.commit(Path(meta), manifest, config_updates=updates, overwrite=overwrite)
    except BaseException:
        partial.abort()
        raise
