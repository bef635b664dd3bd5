"""Training throughput: DeepSpeed ZeRO-2 and ZeRO-3 against a plain PyTorch loop, same model, batch and loss.

Each configuration runs in its own process (one rank, gloo) so peak memory is its own: tokens/s over the timed
steps (after warm-up) and peak RSS (ru_maxrss), plus RSS just before the model is built (imports, DeepSpeed).

    .venv/bin/python benchmarks/train_throughput.py [--steps 20] [--hidden 128] [--layers 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, args) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    import torch

    from mergescale.training import engine as E
    from mergescale.training.config import TrainConfig
    from mergescale.training.data import MixtureSchedule, collate, encode
    from mergescale.training.recipes import prepare_data

    torch.set_num_threads(args.threads)
    tmp = Path(args.work)
    cfg = TrainConfig(base=str(tmp / "base"), tasks=["held-in:sentiment"], data_dir=str(tmp / "data"),
                      max_input_len=args.input_len, max_output_len=args.output_len, dropout=0.0)
    sources, _, _ = prepare_data("expert", cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.base)
    sched = MixtureSchedule([len(s.examples) for s in sources], None, 0)
    batches = [collate([encode(tok, *sources[s].examples[i], args.input_len, args.output_len)
                        for s, i in sched.batch(step, args.batch)], tok.pad_token_id) for step in range(args.steps + 3)]
    if mode != "torch":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    rss_before = _rss_mb()
    torch.manual_seed(0)
    if mode == "torch":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(b):
            loss = E.target_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"])
            (loss / (b["labels"][:, 1:] != -100).sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        ds_file = Path(__file__).parents[1] / f"configs/deepspeed/{mode}.json"
        ds = E.build_ds_config(json.loads(ds_file.read_text()), batch_size=args.batch, micro_batch_size=args.batch,
                               grad_accum=1, grad_clip=None, bf16=False)
        model = E.load_model(cfg.base, 0.0, False, ds, False)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
                                          config=ds)

        def step(b):
            loss = E.target_loss_sum(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"])
            engine.backward(loss / (b["labels"][:, 1:] != -100).sum())
            engine.step()
    for b in batches[:3]:
        step(b)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[3:])
    t0 = time.perf_counter()
    for b in batches[3:]:
        step(b)
    dt = time.perf_counter() - t0
    return {"mode": mode, "tokens_per_s": tokens / dt, "step_s": dt / args.steps, "rss_before_model_mb": rss_before,
            "peak_rss_mb": _rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--modes", default="torch,zero2,zero3")
    p.add_argument("--_child")
    p.add_argument("--work")
    args = p.parse_args()
    if args._child:
        print("RESULT " + json.dumps(child(args._child, args)))
        return
    from mergescale.eval.fixtures import write_fixture_data
    from mergescale.tiny import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llama(Path(tmp) / "base", seed=0, hidden=args.hidden, layers=args.layers,
                         heads=max(1, args.hidden // 32))
        write_fixture_data(Path(tmp) / "data", "held-in:sentiment", n=64)
        rows = []
        for mode in args.modes.split(","):
            passed = ("steps", "batch", "hidden", "layers", "input_len", "output_len", "threads")
            cmd = [sys.executable, __file__, "--_child", mode, "--work", tmp] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in passed]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(line[0][7:]))
    print(f"tiny Llama hidden {args.hidden}, {args.layers} layers; batch {args.batch}, {args.steps} timed steps, "
          f"{args.threads} thread(s)")
    print("| loop | tokens/s | s/step | RSS before model (MB) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {r['rss_before_model_mb']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
