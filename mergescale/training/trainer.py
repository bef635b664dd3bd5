"""The training loop every recipe shares, run by each Ray Train worker (or any process group: torchrun works too).

Read top to bottom: process group -> DeepSpeed config -> model + optimizer -> engine -> resume -> steps
(deterministic batch of (seed, step), loss on target tokens, lr of the step, checkpoint, metrics, validation,
early stop) -> consolidated Hugging Face checkpoint written by rank 0.

Loss scaling: each micro-batch's loss is its sum of target-token losses divided by the target tokens of the whole
global batch (an all-reduced count), times world x accumulation (DeepSpeed divides by both). So the gradient is the
token mean over the global batch whatever the split into workers and micro-batches: ZeRO-3 on 2 workers and
ZeRO-2 on 1 worker with accumulation 2 take the same steps (up to float summation order).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mergescale.training import checkpoints as C
from mergescale.training import engine as E
from mergescale.training.config import TrainConfig
from mergescale.training.data import MixtureSchedule, Source, collate, encode, target_token_count
from mergescale.training.output import METRICS, write_model

log = logging.getLogger(__name__)
FAIL_ENV = "MERGESCALE_TRAIN_FAIL_AT_STEP"  # fault injection for tests, read by the launcher (see run_worker)
STOPPED = "stopped.json"  # in the work directory: why the workers ended a run without a model (see _stop)


def run_worker(recipe: str, cfg: TrainConfig, sources: list[Source], val: list[tuple[str, str]], data_info: dict,
               ds_base: dict, out: Path, work: Path, device: torch.device, progress: bool, overwrite: bool,
               fail_at: int = 0) -> dict | None:
    """Train on this rank; rank 0 returns the output manifest, other ranks None. fail_at (tests): rank 0 SIGKILLs
    itself at the first checkpoint at or after that step of a fresh (not resumed) run."""
    import deepspeed
    from transformers import AutoTokenizer

    # -- process group: Ray Train (or torchrun) already made it; DeepSpeed reuses it --------------------------
    t_setup = time.time()
    backend = "nccl" if device.type == "cuda" else "gloo"
    compiling = device.type == "cpu" and not E.cpu_comm_op_built()
    if compiling and progress and int(os.environ.get("RANK", "0")) == 0:
        print("setup: compiling DeepSpeed's CPU communication op (the first training on this machine only, about "
              "2 minutes; cached in ~/.cache/torch_extensions afterwards)", flush=True)
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if compiling and progress and rank == 0:
        print(f"setup: DeepSpeed op ready after {time.time() - t_setup:.0f} s", flush=True)
    if world != cfg.cluster.workers:
        raise RuntimeError(f"process group has {world} ranks but cluster.workers is {cfg.cluster.workers}")
    accum, micro = cfg.grad_accum, cfg.micro_batch_size

    if device.type == "cpu":
        E.keep_freed_memory()  # else every step faults its large buffers in afresh (docs/BENCHMARKS.md)

    # -- model, optimizer, engine ------------------------------------------------------------------------------
    bf16 = E.use_bf16(cfg.precision, device)
    ds_config = E.build_ds_config(ds_base, batch_size=cfg.batch_size, micro_batch_size=micro, grad_accum=accum,
                                  grad_clip=cfg.grad_clip, bf16=bf16)
    stage = ds_config["zero_optimization"]["stage"]
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.base)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = E.load_model(cfg.base, cfg.dropout, bf16, ds_config, cfg.gradient_checkpointing, cfg.allow_pickle)
    optimizer = E.build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

    # -- resume from the newest checkpoint this run sealed, its files verified first (DeepSpeed unpickles them) --
    ckpt_root = work / "checkpoints"
    state = {"step": 0, "best_val": None, "bad_evals": 0, "last_loss": None, "last_val": None, "tokens": 0}
    tag = _verified_resume_tag(ckpt_root, data_info["fingerprint"], rank, world)
    if tag is not None:
        _, client = engine.load_checkpoint(str(ckpt_root), tag=tag)
        state.update({k: client[k] for k in state if k in client})
        if rank == 0:
            log.info("resuming from %s at step %d", ckpt_root / tag, state["step"])
    start = state["step"]
    metrics_path = work / METRICS
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(metrics_path, start)

    schedule = MixtureSchedule([len(s.examples) for s in sources], cfg.mixture_cap, cfg.seed)
    bar = _progress(rank == 0 and progress, cfg.max_steps, start)
    t0, tokens_run, target_run = time.time(), 0, 0
    step = start
    for step in range(start, cfg.max_steps):
        # -- this rank's micro-batches of the global batch of (seed, step) ------------------------------------
        pairs = schedule.batch(step, cfg.batch_size)
        per_rank = micro * accum
        mine = pairs[rank * per_rank:(rank + 1) * per_rank]
        batches = [collate([encode(tokenizer, *sources[s].examples[i], cfg.max_input_len, cfg.max_output_len)
                            for s, i in mine[m * micro:(m + 1) * micro]], pad_id) for m in range(accum)]
        counts = torch.tensor([sum(target_token_count(b["labels"]) for b in batches),
                               sum(int(b["attention_mask"].sum()) for b in batches)], dtype=torch.float64,
                              device=engine.device)
        dist.all_reduce(counts)  # target tokens (the loss normaliser) and all tokens of the global batch
        global_tokens, all_tokens = max(counts[0].item(), 1.0), int(counts[1].item())

        # -- forward/backward per micro-batch; DeepSpeed steps the optimizer on the last one -----------------
        E.set_lr(engine.optimizer, E.lr_at(step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.lr_schedule,
                                           cfg.min_lr_ratio))
        torch.manual_seed(E.step_seed(cfg.seed, step, rank))  # dropout masks: a function of (seed, step, rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        for b in batches:
            b = {k: v.to(engine.device) for k, v in b.items()}
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            s = E.target_loss_sum(logits, b["labels"])
            engine.backward(s * (world * accum) / global_tokens)
            engine.step()
            loss_sum += s.detach().double()
        dist.all_reduce(loss_sum)  # every rank sees the same loss, so every rank stops at the same step
        state.update(step=step + 1, last_loss=loss_sum.item() / global_tokens)
        if not math.isfinite(state["last_loss"]):
            bar.close()
            return _stop(work, rank, f"the training loss is {state['last_loss']} at step {step + 1}")
        state["tokens"] += int(global_tokens)
        tokens_run += all_tokens
        target_run += int(global_tokens)

        # -- validation loss and early stop (same all-reduced numbers on every rank: same decision) ------------
        stop = False
        if cfg.eval_every and val and (step + 1) % cfg.eval_every == 0:
            state["last_val"] = _validation_loss(engine, tokenizer, val, cfg, pad_id, rank, world)
            if not math.isfinite(state["last_val"]):
                bar.close()
                return _stop(work, rank, f"the validation loss is {state['last_val']} at step {step + 1}")
            if cfg.early_stop:
                best = state["best_val"]
                if best is None or state["last_val"] < best - cfg.early_stop.min_delta:
                    state.update(best_val=state["last_val"], bad_evals=0)
                else:
                    state["bad_evals"] += 1
                stop = state["bad_evals"] >= cfg.early_stop.patience

        # -- metrics, progress, periodic checkpoint -----------------------------------------------------------
        elapsed = time.time() - t0
        if rank == 0:
            row = {"step": step + 1, "loss": state["last_loss"], "lr": E.lr_at(step, cfg.lr, cfg.max_steps,
                   cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio), "tokens": all_tokens,
                   "target_tokens": int(global_tokens), "tokens_per_s": tokens_run / max(elapsed, 1e-9),
                   "elapsed_s": round(elapsed, 3)}
            if state["last_val"] is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                row["val_loss"] = state["last_val"]
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{state['last_loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)  # tqdm's remaining-time estimate is the ETA
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps and not stop:
            _checkpoint(engine, ckpt_root, state, data_info, cfg.keep_checkpoints, rank, world)
            if fail_at and step + 1 >= fail_at and start == 0 and rank == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash mid-run, as a preempted node would
        if stop:
            break
    bar.close()
    train_s = time.time() - t0

    # -- consolidated Hugging Face checkpoint -----------------------------------------------------------------
    sd = E.consolidated_state_dict(engine, stage)
    manifest = None
    if rank == 0:
        manifest = {
            "kind": "mergescale-train", "recipe": recipe, "config": cfg.model_dump(mode="json"), "data": data_info,
            "deepspeed": ds_config, "steps": state["step"], "stopped_early": state["step"] < cfg.max_steps,
            "final": {"train_loss": state["last_loss"], "val_loss": state["last_val"],
                      "target_tokens": state["tokens"]},
            "world_size": world, "resumed_from_step": start or None,
            # this process's run (a resumed run: the steps since the resume); setup: process group to first step
            "timing": {"setup_s": round(t0 - t_setup, 3), "train_s": round(train_s, 3),
                       "steps_run": state["step"] - start, "tokens_per_s": round(tokens_run / max(train_s, 1e-9), 2),
                       "target_tokens_per_s": round(target_run / max(train_s, 1e-9), 2),
                       "torch_threads": torch.get_num_threads()},
        }
        manifest = write_model(sd, out, base=cfg.base, tokenizer=tokenizer, manifest=manifest, metrics=metrics_path,
                               shard_size=cfg.out_shard_size, overwrite=overwrite)
    dist.barrier()
    return manifest


def _checkpoint(engine, root: Path, state: dict, data_info: dict, keep: int, rank: int, world: int) -> None:
    tag = C.checkpoint_tag(state["step"])
    engine.save_checkpoint(str(root), tag=tag, client_state={**state, "fingerprint": data_info["fingerprint"]})
    dist.barrier()  # every rank's shards are on disk before they are hashed and old checkpoints go
    names = _broadcast(C.checkpoint_files(root / tag) if rank == 0 else None)
    digests = _digests(root / tag, names, rank, world)
    if rank == 0:
        C.seal(root / tag, data_info["fingerprint"], digests)
        C.rotate_checkpoints(root, keep)


def _verified_resume_tag(root: Path, fingerprint: str, rank: int, world: int) -> str | None:
    """The newest sealed checkpoint with every file matching its seal (the ranks hash a share each), or None.
    Every rank gets the same answer, or the same error."""
    found, problem = None, None
    if rank == 0:
        try:
            if (sealed := C.newest_sealed(root)) is not None:
                found = (sealed[0], sealed[1], C.check_listing(root / sealed[0], sealed[1], fingerprint))
        except C.CheckpointMismatch as e:
            problem = str(e)
    found, problem = _broadcast((found, problem))
    if problem is None and found is not None:
        tag, recorded, names = found
        digests = _digests(root / tag, names, rank, world)
        if rank == 0:
            try:
                C.check_digests(root / tag, recorded, digests)
            except C.CheckpointMismatch as e:
                problem = str(e)
        problem = _broadcast(problem)
    if problem is not None:
        raise C.CheckpointMismatch(problem)
    return found[0] if found else None


def _digests(directory: Path, names: list[str], rank: int, world: int) -> dict[str, dict]:
    """sha256 of the files, each rank hashing every world-th one; the whole map on rank 0 (others: {})."""
    mine = C.file_digests(directory, names[rank::world])
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if rank == 0 else {}


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stop(work: Path, rank: int, what: str) -> None:
    """End the run without a model: rank 0 records why for the driver (which reports it; Ray Train would
    only restart the same steps, so the workers return instead of raising)."""
    if rank == 0:
        (work / STOPPED).write_text(json.dumps({"error": what}))
    dist.barrier()
    return None


@torch.no_grad()
def _validation_loss(engine, tokenizer, val, cfg: TrainConfig, pad_id: int, rank: int, world: int) -> float:
    """Token-mean loss over the held-out examples; each rank takes a strided share, sums are all-reduced.
    Under ZeRO-3 every rank must run the same number of forwards (each gathers parameters collectively)."""
    engine.eval()
    mine = val[rank::world]
    n_batches = -(-len(val[0::world]) // cfg.micro_batch_size)  # rank 0 has the most: everybody runs that many
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for k in range(n_batches):
        chunk = mine[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size] or val[:1]
        b = collate([encode(tokenizer, i, t, cfg.max_input_len, cfg.max_output_len) for i, t in chunk], pad_id)
        b = {k2: v.to(engine.device) for k2, v in b.items()}
        s = E.target_loss_sum(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        if mine[k * cfg.micro_batch_size:(k + 1) * cfg.micro_batch_size]:  # padding forwards count for nothing
            sums += torch.tensor([s.item(), target_token_count(b["labels"])], dtype=torch.float64, device=engine.device)
    dist.all_reduce(sums)
    engine.train()
    return (sums[0] / sums[1].clamp(min=1)).item()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows past the resumed step: a resumed run rewrites them, so the log has each step once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(r + "\n" for r in rows))


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
