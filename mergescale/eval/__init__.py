"""Evaluation: task registry, rank-classification and generation scoring backends, normalized metrics.

    from mergescale.eval import evaluate
    result = evaluate("models/merged", tasks="held-out,held-in:sentiment", backend="hf", replicas=1,
                      out="results/merged", data_dir="data/")   # data_dir: offline Parquet/JSONL per task
    result["metrics"]   # per-task dicts: task, category, group, metric, score, acc, acc_norm, rouge_l, ...

Modules: tasks (registry; the training engine uses it), templates (prompts applied strictly), scoring (the shared
rule), backends (hf, vllm), runner (evaluate), results (cache + Parquet), aggregate (the paper's normalization),
fixtures (synthetic data).
"""


def evaluate(model_dir, **kw):
    """See mergescale.eval.runner.evaluate; in this process or on Ray replicas (mergescale.api.evaluate chooses).
    Imported lazily: the task registry must not pull in torch."""
    from mergescale.api import evaluate as _evaluate

    return _evaluate(model_dir, **kw)
