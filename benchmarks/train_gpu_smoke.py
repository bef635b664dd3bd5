"""GPU smoke check of the trainer core without Ray: NCCL, bf16, ZeRO-2 (AdamW) and ZeRO-3 (Adafactor) on one GPU.

Calls mergescale.training.trainer.run_worker directly in a one-rank NCCL process group (what each Ray Train worker
runs), on a locally built tiny Llama and an in-memory echo task; prints loss, tokens/s and peak GPU memory, and
checks the consolidated bf16 checkpoint loads in transformers.

    python benchmarks/train_gpu_smoke.py HIDDEN LAYERS [RESULT_JSON]      # e.g. 1024 8
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from mergescale.tiny import build_tiny_llama
    from mergescale.training.config import TrainConfig, deepspeed_json
    from mergescale.training.data import Source
    from mergescale.training.trainer import run_worker

    hidden, layers = int(sys.argv[1]), int(sys.argv[2])
    root = Path(tempfile.mkdtemp(prefix="train-gpu-"))
    base = build_tiny_llama(root / "base", seed=0, hidden=hidden, layers=layers, heads=hidden // 64,
                            max_shard_size="2GB")
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    ex = [(f"Repeat the word: {' '.join(words[(i * 7 + j) % 12] for j in range(40))} {words[i % 12]}",
           " " + words[i % 12]) for i in range(256)]
    dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
    torch.cuda.set_device(0)
    res = {}
    for stage, opt in (("zero2", "adamw"), ("zero3", "adafactor")):
        cfg = TrainConfig(base=str(base), tasks=["echo"], max_steps=30, batch_size=16, micro_batch_size=8, lr=1e-3,
                          optimizer=opt, checkpoint_every=10, max_input_len=256, max_output_len=16, deepspeed=stage)
        out = root / f"out-{stage}"
        torch.cuda.reset_peak_memory_stats()
        t = time.time()
        m = run_worker("expert", cfg, [Source("echo", ex)], [], {"fingerprint": "f" * 64}, deepspeed_json(stage), out,
                       root / f".{stage}.train", torch.device("cuda:0"), False, True)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        model = AutoModelForCausalLM.from_pretrained(out)
        res[stage] = {"optimizer": opt, "wall_s": round(time.time() - t, 1), "first_loss": rows[0]["loss"],
                      "last_loss": rows[-1]["loss"], "tokens_per_s": round(rows[-1]["tokens_per_s"]),
                      "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20),
                      "loaded_dtype": str(next(model.parameters()).dtype), "bf16": m["deepspeed"]["bf16"]["enabled"],
                      "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1)}
        print(stage, res[stage], flush=True)
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
