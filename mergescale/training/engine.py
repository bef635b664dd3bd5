"""DeepSpeed building blocks the trainer loop calls: config, model, optimizer, schedule, loss, consolidation
(checkpoint files: checkpoints.py).

Plain functions; the loop in trainer.py reads top to bottom and calls these.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from mergescale.training.data import IGNORE

# Names models use for dropout probabilities (Llama: attention_dropout; GPT-2: *_pdrop; T5: dropout_rate; ...).
DROPOUT_FIELDS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "classifier_dropout")


def cpu_comm_op_built() -> bool:
    """Has DeepSpeed's CPU communication op (deepspeed_shm_comm, compiled by the first init_distributed on a
    machine: ~2 minutes) been built into torch's extension cache already?"""
    import os
    from pathlib import Path

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("**/deepspeed_shm_comm*/*.so"))


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from the heap and keep what is freed there (no mmap, no trim): a CPU
    training step frees and allocates its large buffers (activations, logits, gradients, DeepSpeed's flat buffers)
    again every step, and by default each one is a fresh mmap whose pages the kernel faults in and zeroes anew.
    Process-wide, so only the trainer's own process calls it; the arithmetic is untouched. False where the C
    library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))  # -1: never trim


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_ds_config(base: dict, *, batch_size: int, micro_batch_size: int, grad_accum: int, grad_clip: float | None,
                    bf16: bool) -> dict:
    """The DeepSpeed JSON with this run's batch geometry, clipping and precision filled in."""
    ds = json.loads(json.dumps(base))
    ds.update(train_batch_size=batch_size, train_micro_batch_size_per_gpu=micro_batch_size,
              gradient_accumulation_steps=grad_accum, gradient_clipping=grad_clip or 0.0)
    ds["bf16"] = {"enabled": bf16}
    ds.setdefault("zero_allow_untested_optimizer", True)  # our client optimizers (torch AdamW, Adafactor)
    return ds


def load_model(base: str, dropout: float, bf16: bool, ds_config: dict, gradient_checkpointing: bool,
               allow_pickle: bool = False):
    """The base model with dropout set. Under ZeRO-3, HfDeepSpeedConfig makes from_pretrained load each weight
    straight into its partition (zero.Init), so no rank ever holds the whole model. Safetensors only unless
    allow_pickle (the driver has refused a pickle-only base already; this keeps transformers from falling back)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = AutoConfig.from_pretrained(base)
    for field in DROPOUT_FIELDS:
        if isinstance(getattr(cfg, field, None), float):
            setattr(cfg, field, dropout)
    cfg.use_cache = False
    keep = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(base, config=cfg, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 use_safetensors=None if allow_pickle else True)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def build_optimizer(name: str, params, lr: float, weight_decay: float):
    """AdamW (torch) or Adafactor (transformers, external lr). ZeRO hands the optimizer flat partitions, so
    Adafactor keeps unfactored second moments there (same update rule, more optimizer memory)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                     warmup_init=False)


def lr_at(step: int, lr: float, max_steps: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay or constant.
    A pure function of the step, so a resumed run needs no scheduler state."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the dropout masks of (step, rank): resume replays them without saving RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def target_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over target tokens (labels != IGNORE), in float32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def consolidated_state_dict(engine, stage: int) -> dict[str, torch.Tensor] | None:
    """The full model on rank 0 (None elsewhere). Every rank must call it: ZeRO-3 gathers each partitioned
    parameter in turn, so rank 0 holds one full copy of the weights in the training dtype."""
    if stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if engine.global_rank == 0 else None
    if engine.global_rank != 0:
        return None
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
