"""`mergescale eval`: evaluate a model directory on registry tasks; `mergescale merge-eval`: merge a config into
the base loaded once and evaluate it there, nothing written but the results (registered by mergescale/cli.py)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="model directory (safetensors + config + tokenizer) or a Hub id")
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    p.add_argument("--replicas", type=int, default=1, help="K backend replicas as Ray actors (1: in process)")
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--address", help="Ray cluster address for replicas (default: an embedded local Ray)")
    p.add_argument("--kv-cache-gb", type=float, help="vllm backend: KV cache size in GiB (CPU default 2, "
                   "VLLM_CPU_KVCACHE_SPACE; GPU default: vLLM's memory fraction)")
    add_shared_arguments(p)


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `eval` that `merge-eval` shares."""
    p.add_argument("--tasks", default="held-out",
                   help="comma-separated selectors: all, held-in, held-out, held-in:<category>, <category>, <task>")
    p.add_argument("--out", help="output directory (cache, examples/<task>.parquet, metrics.parquet/json)")
    p.add_argument("--data-dir", help="offline data: DIR/<task>/<split>.parquet|jsonl|json|arrow (default: the Hub)")
    p.add_argument("--template", help="template name to use where a task has it (default: each task's first); a "
                                      "name no selected task has is an error")
    p.add_argument("--limit", type=int, help="at most N examples per task (N >= 1)")
    p.add_argument("--max-unscorable", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of a task's rows that may be left out because they cannot be scored (a label out "
                        "of range, no target, ...); over it the evaluation fails (default 0: any such row fails)")
    p.add_argument("--max-length", type=int, help="token window (default: the model's max_position_embeddings - 1; "
                   "on CPU at most 2048)")
    p.add_argument("--chat-template", action="store_true", help="prompt in the tokenizer's chat template "
                   "(instruction-tuned bases); default: the paper's raw prompts. Recorded as prompt_format")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    p.add_argument("--device", help="hf backend device (default: cuda if available, else cpu)")
    p.add_argument("--tasks-yaml", action="append", default=[], help="extra task YAML file(s) to register")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def shared_kwargs(args) -> dict:
    return dict(tasks=args.tasks, out=args.out, data_dir=args.data_dir, template=args.template, limit=args.limit,
                max_length=args.max_length, dtype=args.dtype, device=args.device,
                max_unscorable=args.max_unscorable, chat_template=args.chat_template)


def run(args) -> int:
    from mergescale.eval import evaluate

    def work():
        return evaluate(args.model_dir, backend=args.backend, replicas=args.replicas, address=args.address,
                        num_cpus_per_replica=args.num_cpus_per_replica,
                        num_gpus_per_replica=args.num_gpus_per_replica, progress=not args.quiet,
                        backend_kw={"kv_cache_gb": args.kv_cache_gb} if args.kv_cache_gb else None,
                        **shared_kwargs(args))

    return _report(args, work)


def run_merge_eval(args) -> int:
    from mergescale.api import merge_eval
    from mergescale.eval.merge_eval import load_resident, resident_source

    engines = []  # the resident's backend, stopped when the command ends

    def work():
        source = resident_source(args.config)
        kw = {"kv_cache_gb": args.kv_cache_gb} if args.backend == "vllm" and args.kv_cache_gb else {}
        resident = load_resident(source, args.backend, device=args.device, dtype=args.dtype,
                                 max_length=args.max_length, **kw)
        engines.append(resident.backend)
        result = merge_eval(args.config, resident, workers=args.workers, address=args.address,
                            progress=not args.quiet, **shared_kwargs(args))
        by = f" on {args.workers or 'cluster.workers'} Ray merge actors" if args.workers or args.address else ""
        print(f"merged {args.config}{by} into {source} loaded once; pushed model "
              f"{result['manifest']['pushed']['fingerprint']}, nothing written but the results")
        return result

    try:
        return _report(args, work)
    finally:
        for engine in engines:  # a vLLM engine stops now, not at interpreter exit (backends.VLLMBackend.close)
            getattr(engine, "close", lambda: None)()


def _report(args, work) -> int:
    from mergescale.checkpoint.read import CheckpointError
    from mergescale.errors import MergeInputError
    from mergescale.eval.backends import EvalError
    from mergescale.eval.tasks import TaskError, register_tasks

    try:
        for y in args.tasks_yaml:
            register_tasks(y, replace=True)
        result = work()
    except (EvalError, TaskError, CheckpointError, MergeInputError, ConnectionError) as e:  # ConnectionError: Ray
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'task':<20} {'category':<26} {'metric':<13} {'score':>7} {'ex/s':>7} {'n':>6} {'unscorable':>10}")
    for m in result["metrics"]:
        speed = result["timing"].get(m["task"], {}).get("examples_per_s")
        rate = f"{speed:>7.2f}" if speed else f"{'-':>7}"
        print(f"{m['task']:<20} {m['category']:<26} {m['metric']:<13} {m['score']:>7.4f} {rate} {m['n']:>6} "
              f"{m['n_unscorable']:>10}")
    print(f"{result['computed']} examples computed, {result['cached']} from cache"
          + (f"; results in {result['out']}" if result["out"] else ""))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model on held-in / held-out tasks",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    m = subparsers.add_parser("merge-eval", help="merge a config into its base loaded once and evaluate it there, "
                              "without writing the merged model", description=__doc__)
    m.add_argument("config", help="merge config (YAML), as for `mergescale merge`")
    m.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    m.add_argument("--kv-cache-gb", type=float, help="vllm backend: KV cache size in GiB (as for eval)")
    m.add_argument("--workers", type=int, help="merge on K Ray actors that send their rows to this process "
                   "(default: this process merges)")
    m.add_argument("--address", help="Ray cluster address for the merge actors (default: an embedded local Ray)")
    add_shared_arguments(m)
    m.set_defaults(func=run_merge_eval)
    return p
