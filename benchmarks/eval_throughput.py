"""Rank-classification throughput: mergescale's hf backend vs lm-evaluation-harness 0.4.13's HF backend.

Same model (a local 8-layer Llama, hidden 256), same local multiple-choice task (4 choices, long contexts),
same prompt text, same CPU threads. Checks that both give the same accuracy and per-choice log-likelihoods,
then writes the "## Evaluation throughput" section of docs/BENCHMARKS.md (other sections are left alone).

lm-eval is installed into its own venv (.bench/venv), never into mergescale's environment:
    python benchmarks/eval_throughput.py [--examples 200] [--threads 1] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench"
VENV = BENCH / "venv"
LM_EVAL = "lm-eval[hf]==0.4.13"

LMEVAL_TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""

OUR_TASK = """tasks:
  - name: bench_mc
    category: benchmark
    data_files: {{validation: {data}}}
    templates:
      - name: plain
        jinja: "{{{{ context }}}}\\nQuestion: {{{{ question }}}}\\nAnswer: ||| {{{{ answer_choices[label] }}}}"
        answer_choices: '{{{{ choices | join(" ||| ") }}}}'
"""

LMEVAL_RUNNER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained=sys.argv[1], dtype="float32", device="cpu", batch_size=int(sys.argv[5]))
tm = TaskManager(include_path=sys.argv[2])
evaluator.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=tm, limit=4)  # warm-up
t = time.perf_counter()
res = evaluator.simple_evaluate(model=lm, tasks=["bench_mc"], task_manager=tm, log_samples=True)
sec = time.perf_counter() - t
r = res["results"]["bench_mc"]
samples = sorted(res["samples"]["bench_mc"], key=lambda s: s["doc_id"])
json.dump({"seconds": sec, "acc": r["acc,none"], "acc_norm": r["acc_norm,none"], "n": len(samples),
           "ll": [[float(x[0]) for x in s["filtered_resps"]] for s in samples]}, open(sys.argv[3], "w"))
"""


def ensure_lmeval_venv() -> Path:
    py = VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import lm_eval.models.huggingface"],
                                        capture_output=True).returncode == 0
    if not ok:
        import transformers

        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        # torch first, pinned to ours, so pip never pulls a CUDA build; then lm-eval with our transformers
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"transformers=={transformers.__version__}", LM_EVAL],
                       check=True)
    return py


WORDS = ("the a river city old young man woman went to market bought sold bread fish because it was raining "
         "sunny cold warm day night friend teacher student book read wrote letter house garden tree grew "
         "quickly slowly happy sad after before then finally").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        context = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 60))) + "."
        question = " ".join(rng.choice(WORDS) for _ in range(8)) + "?"
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(4)]
        rows.append({"id": i, "context": context, "question": question, "choices": choices, "label": rng.randrange(4)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_model(path: Path) -> Path:
    from mergescale.tiny import build_tiny_llama

    if not (path / "config.json").exists():
        build_tiny_llama(path, seed=0, vocab_size=384, hidden=256, layers=8, heads=8, max_position_embeddings=1024,
                         max_shard_size="50MB")
    return path


def write_section(text: str) -> None:
    doc = ROOT / "docs" / "BENCHMARKS.md"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pat = re.compile(r"^## Evaluation throughput\n.*?(?=^## |\Z)", re.S | re.M)
    m = pat.search(old)
    if m and "\n### GPU check" in m.group(0):  # hand-recorded device results are kept across reruns
        text = text.rstrip("\n") + "\n" + m.group(0)[m.group(0).index("\n### GPU check"):]
    new = pat.sub(lambda _: text.rstrip("\n") + "\n\n", old) if m else old.rstrip("\n") + "\n\n" + text
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both harnesses")
    ap.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    py = ensure_lmeval_venv()
    model = build_model(BENCH / "eval_model")
    data = BENCH / "eval_data" / f"bench_mc_{args.examples}.jsonl"
    if not data.exists():
        make_data(data, args.examples)
    (BENCH / "lmeval_tasks").mkdir(parents=True, exist_ok=True)
    (BENCH / "lmeval_tasks" / "bench_mc.yaml").write_text(LMEVAL_TASK.format(data=data))
    (BENCH / "our_tasks.yaml").write_text(OUR_TASK.format(data=data))
    (BENCH / "run_lmeval.py").write_text(LMEVAL_RUNNER)

    # -- lm-eval (own venv, own process) ---------------------------------------------------------------------
    lm_out = BENCH / "lmeval_result.json"
    subprocess.run([str(py), str(BENCH / "run_lmeval.py"), str(model), str(BENCH / "lmeval_tasks"), str(lm_out),
                    str(args.threads), str(args.batch_size)], check=True)
    lm = json.loads(lm_out.read_text())

    # -- mergescale (engine built before timing, as lm-eval's model is) ---------------------------------------
    import shutil

    import pyarrow.parquet as pq

    from mergescale.eval import evaluate
    from mergescale.eval.backends import HFBackend
    from mergescale.eval.tasks import register_tasks

    register_tasks(BENCH / "our_tasks.yaml", replace=True)
    engine = HFBackend(model)
    evaluate(model, tasks="bench_mc", engine=engine, limit=4, progress=False)  # warm-up
    out = BENCH / "ours_out"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    ours = evaluate(model, tasks="bench_mc", engine=engine, out=out, progress=False)
    sec = time.perf_counter() - t
    (m,) = ours["metrics"]
    rows = sorted(pq.read_table(out / "examples" / "bench_mc.parquet").to_pylist(), key=lambda r: int(r["example_id"]))
    diff = max(abs(a - b) for r, theirs in zip(rows, lm["ll"]) for a, b in zip(r["logprobs"], theirs))
    n = m["n"]
    assert n == lm["n"] == args.examples, (n, lm["n"])
    same_acc = abs(m["acc"] - lm["acc"]) < 1e-9 and abs(m["acc_norm"] - lm["acc_norm"]) < 1e-9
    ours_rate, lm_rate = n / sec, n / lm["seconds"]
    ctx_tokens = sum(len(engine.tokenizer(json.loads(x)["context"])["input_ids"])
                     for x in data.read_text().splitlines()) / n
    cmd = f"python benchmarks/eval_throughput.py --examples {args.examples} --threads {args.threads} " \
          f"--batch-size {args.batch_size}"
    table = (
        "| harness | examples/s | seconds | acc | acc_norm |\n|---|---:|---:|---:|---:|\n"
        f"| lm-eval 0.4.13 `hf` (batch {args.batch_size}) | {lm_rate:.2f} | {lm['seconds']:.1f} | {lm['acc']:.4f} | "
        f"{lm['acc_norm']:.4f} |\n"
        f"| mergescale `hf` | {ours_rate:.2f} | {sec:.1f} | {m['acc']:.4f} | {m['acc_norm']:.4f} |\n"
    )
    text = (
        "## Evaluation throughput\n\n"
        f"Command: `{cmd}` (lm-eval runs from its own venv, .bench/venv).\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), CPU only, torch threads "
        f"{args.threads}, float32. Model: local Llama, 8 layers, hidden 256, 8 heads, vocab 384 "
        f"({sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M params). Task: {n} local 4-choice "
        f"examples, mean context {ctx_tokens:.0f} tokens, choices 2-5 words. Timing: the evaluation call only "
        "(model loaded and warmed up in both).\n\n"
        + table +
        f"\nSpeed-up: **{ours_rate / lm_rate:.2f}x**. Same accuracy: {same_acc}; max |log-likelihood difference| "
        f"over {sum(len(r['logprobs']) for r in rows)} choices: {diff:.2e}.\n"
        "Why: mergescale runs each context once and scores its choices against the cached prefix (lm-eval runs "
        "context+choice once per choice), and keeps only the last context position's logits.\n"
    )
    print(text)
    if not args.no_write:
        write_section(text)
    return 0 if same_acc and diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
