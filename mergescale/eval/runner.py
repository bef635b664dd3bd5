"""`evaluate()`: validate everything, build token-level requests once, run them (in process or on Ray
replicas), cache scores as chunks finish, write per-example rows and per-task metrics as tasks finish."""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import pyarrow as pa

from mergescale.eval.backends import (
    BACKENDS,
    CPU_MAX_LENGTH,
    DTYPES,
    EvalError,
    check_device,
    load_tokenizer,
    make_backend,
    model_max_length,
)
from mergescale.eval.results import (
    GENERATE,
    ScoreCache,
    cache_key,
    model_fingerprint,
    write_json_atomic,
    write_parquet_atomic,
)
from mergescale.eval.scoring import GEN_METRICS, chat_prompt, gen_request, rank_prediction, rank_request
from mergescale.eval.tasks import PromptedExample, Task, TaskError, metric_column, tasks_for

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One example's work: its request and the cache keys of its choices (or its generation)."""

    task: str
    template: str
    example: PromptedExample
    request: object
    keys: list[str]
    cost: int  # tokens, for sorting and balancing


@dataclass
class Chunk:
    kind: str  # "rank" | "generate"
    items: list[Item] = field(default_factory=list)

    @property
    def cost(self) -> int:
        return sum(i.cost for i in self.items)


def _prepare(task: Task, template: str | None, examples, tok, max_length: int, model_fp: str, where) -> list[Item]:
    tpl = task.template(template).name
    items = []
    for ex in examples:
        if task.scoring == "rank":
            try:
                req = rank_request(tok, ex, max_length)
            except ValueError as e:  # a choice that does not fit the window, or encodes to no tokens
                raise EvalError(f"task {task.name!r}: {where(int(ex.example_id))}: {e}; a choice must fit the token "
                                "window (--max-length) with at least one token of context") from None
            keys = [cache_key(model_fp, task.name, tpl, ex.example_id, ex.input, c) for c in ex.choices]
            cost = sum(len(c) + len(k) for c, k in zip(req.contexts, req.continuations))
        else:
            req = gen_request(tok, ex, max_length, task.max_new_tokens)
            keys = [cache_key(model_fp, task.name, tpl, ex.example_id, ex.input, f"<generate:{task.max_new_tokens}>")]
            cost = len(req.context) + task.max_new_tokens
        items.append(Item(task.name, tpl, ex, req, keys, cost))
    return items


def make_chunks(items: list[Item], kind: str, chunk_size: int) -> list[Chunk]:
    """Length-sorted chunks (longest first), so each backend batch holds similar lengths."""
    items = sorted(items, key=lambda i: -i.cost)
    return [Chunk(kind, items[s:s + chunk_size]) for s in range(0, len(items), chunk_size)]


def run_chunk(backend, kind: str, requests: list) -> list:
    """Backend-agnostic chunk execution (in process or inside a replica actor)."""
    if kind == "rank":
        return backend.loglikelihood(requests)
    return backend.generate(requests)


def cache_rows(chunk: Chunk, results: list, tok) -> list[dict]:
    rows = []
    for item, res in zip(chunk.items, results):
        base = dict(task=item.task, template=item.template, example_id=item.example.example_id)
        if chunk.kind == "rank":
            for j, (key, lp) in enumerate(zip(item.keys, res)):
                rows.append(dict(base, key=key, choice=j, logprob=float(lp),
                                 n_tokens=len(item.request.continuations[j]), generation=None))
        else:
            rows.append(dict(base, key=item.keys[0], choice=GENERATE, logprob=None, n_tokens=len(res),
                             generation=tok.decode(res, skip_special_tokens=True)))
    return rows


def check_finite(kind: str, item: Item, result, model_dir) -> None:
    """EvalError naming the model and task when an example's log-probabilities are NaN/inf (rank), or its
    generation saw non-finite logits (a backend returns None for it): never a score."""
    bad = result is None if kind == "generate" else not all(math.isfinite(lp) for lp in result)
    if bad:
        what = "generating saw non-finite logits" if kind == "generate" else f"log-probabilities are {list(result)}"
        raise EvalError(f"model {model_dir}: task {item.task!r}, example {item.example.example_id}: {what}. The "
                        "model's weights hold NaN/inf, or its activations overflow in this dtype; nothing is scored")


def example_row(task: Task, item: Item, cache: ScoreCache, model_fp: str, model_dir="") -> dict:
    ex = item.example
    row = dict(model_fingerprint=model_fp, task=task.name, category=task.category, group=task.group,
               template=item.template, example_id=ex.example_id, label=ex.label, target=ex.target)
    if task.scoring == "rank":
        hits = [cache.get(k) for k in item.keys]
        lps = [h["logprob"] for h in hits]
        check_finite("rank", item, lps, model_dir)  # a cache written before this check existed
        pred, pred_norm = rank_prediction(lps, ex.choices)
        row.update(choices=list(ex.choices), logprobs=lps, n_tokens=[h["n_tokens"] for h in hits],
                   n_chars=[len(c) for c in ex.choices], prediction=pred, prediction_norm=pred_norm,
                   acc=float(pred == ex.label), acc_norm=float(pred_norm == ex.label))
    else:
        gen = cache.get(item.keys[0])["generation"].strip()
        row.update(generation=gen, references=list(ex.references),
                   **{m: fn(gen, ex.references) for m, fn in GEN_METRICS.items()})
    return row


def task_metrics(task: Task, rows: list[dict], model_fp: str, model_dir: str, n_unscorable: int = 0,
                 prompt_format: str = "raw") -> dict:
    """Per-task means; `n` examples scored, `n_unscorable` rows left out because they cannot be scored."""
    names = ("acc", "acc_norm") if task.scoring == "rank" else tuple(GEN_METRICS)
    m = {n: (sum(r[n] for r in rows) / len(rows) if rows else float("nan")) for n in names}
    primary = metric_column(task.metric)
    return dict(model_fingerprint=model_fp, model_dir=str(model_dir), task=task.name, category=task.category,
                group=task.group, template=rows[0]["template"] if rows else "", metric=task.metric,
                score=m[primary], n=len(rows), n_unscorable=n_unscorable,
                **{k: m.get(k) for k in ("acc", "acc_norm", *GEN_METRICS)}, prompt_format=prompt_format)


def evaluate(model_dir, tasks="held-out", backend: str = "hf", replicas: int = 1, out=None, data_dir=None,
             template: str | None = None, limit: int | None = None, sample_seed: int | None = None,
             max_length: int | None = None,
             dtype: str = "float32", device: str | None = None, chunk_size: int = 64, address: str | None = None,
             num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0, progress: bool = True,
             backend_kw: dict | None = None, engine=None, max_unscorable: float = 0.0,
             chat_template: bool = False, run_on_replicas=None, weights_fingerprint: str | None = None,
             model_label: str | None = None) -> dict:
    """Evaluate one model on the selected tasks; returns {"metrics": [per-task dict], "computed": examples
    run, "cached": examples reused from out/cache, "out": out dir}. `engine`: an already built HFBackend /
    VLLMBackend for this model, reused in process (e.g. across many evaluations; vLLM start-up is slow).
    `limit` with `sample_seed`: a seeded random sample of each task's examples instead of the first ones.
    `max_unscorable`: the fraction of a task's rows that may be left out because they cannot be scored (a label
    out of range, no target, ...; 0: none). chat_template: prompt each input as the user's turn of the
    tokenizer's chat template (instruction-tuned bases); the default is the paper's raw prompts. Each task's
    metrics record which (`prompt_format`); "timing" (and out/timing.json) has each task's examples computed,
    seconds and examples/s in this run. `run_on_replicas`: what runs the work on `replicas` actors
    (mergescale.cluster.eval_replicas.run_on_replicas, which mergescale.api.evaluate hands down) when replicas > 1
    or an address is given. `weights_fingerprint`: `engine` holds a pushed merge (merge.push), not model_dir's
    weights (model_dir gives the tokenizer and config); its scores are cached under that fingerprint and reported
    as `model_label`. See mergescale/eval/cli.py for the other options."""
    from mergescale.models.sources import resolve_model_dir

    # -- validation: everything that can fail does so before any output is written --------------------------
    if backend not in BACKENDS:
        raise EvalError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise EvalError("backend vllm: vllm is not installed (pip install 'mergescale[vllm]'); or use --backend hf")
    for name, value, low in (("replicas", replicas, 1), ("limit", limit, 1), ("chunk_size", chunk_size, 1)):
        if value is not None and value < low:
            raise EvalError(f"{name} must be >= {low}, got {value}")
    if not 0 <= max_unscorable <= 1:
        raise EvalError(f"max_unscorable is a fraction of a task's rows, from 0 to 1; got {max_unscorable}")
    if dtype not in DTYPES:
        raise EvalError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if weights_fingerprint is not None and engine is None:
        raise EvalError("weights_fingerprint names a pushed model: pass the engine that holds it")
    in_process = engine is not None or (replicas == 1 and address is None)
    if not in_process and run_on_replicas is None:
        raise EvalError(f"replicas={replicas}, address={address!r}: evaluating on Ray replicas takes "
                        "mergescale.eval.evaluate (or mergescale.api.evaluate), which hands the replicas down")
    if in_process and engine is None and device is not None:
        check_device(device)  # replicas check theirs on their own nodes
    model_dir = resolve_model_dir(str(model_dir))
    selected = tasks_for(tasks)
    # `template` is used where a task has it (a study passes one name for many tasks); a name no selected task
    # has is a typo, never a silent fallback. Each task's metrics record the template it used.
    chosen = {t.name: template if template in {x.name for x in t.templates} else None for t in selected}
    if template is not None and not any(chosen.values()):
        raise EvalError(f"template {template!r}: no selected task has it; their templates: " + "; ".join(
            f"{t.name!r}: {', '.join(x.name for x in t.templates)}" for t in selected))
    if template is not None and not all(chosen.values()):
        log.info("template %r: %s use their first template (they have no %r)", template,
                 ", ".join(n for n, c in chosen.items() if c is None), template)
    tok, cfg = load_tokenizer(model_dir)
    if chat_template and not getattr(tok, "chat_template", None):
        raise EvalError(f"{model_dir}: --chat-template asked for, but its tokenizer has no chat template")
    on_gpu = num_gpus_per_replica > 0 or (device or ("cuda" if _cuda() else "cpu")).startswith("cuda")
    max_len = model_max_length(cfg, max_length, cap=None if on_gpu else CPU_MAX_LENGTH)
    for t in selected:
        if t.scoring == "generate" and t.max_new_tokens >= max_len:
            raise EvalError(f"task {t.name!r} generates up to {t.max_new_tokens} tokens, which leaves no context in "
                            f"the {max_len}-token window (--max-length)")
    model_fp = model_fingerprint(model_dir, {"max_length": max_len}, weights=weights_fingerprint)
    label = model_label or model_dir  # what the metrics and errors name
    out = Path(out) if out is not None else None
    cache = ScoreCache(out, model_fp)

    items: dict[str, list[Item]] = {}
    unscorable: dict[str, int] = {}
    too_many = []
    for t in selected:
        rendered = t.render_rows(t.load(None, data_dir), chosen[t.name], limit, None, data_dir, sample_seed=sample_seed)
        where = partial(t.row_origin, None, data_dir)
        try:
            rendered.check(t.name, max_unscorable, where, "--max-unscorable")
        except TaskError as e:
            too_many.append(str(e))
        else:
            if not rendered.examples:  # even where allowed: a score of no rows is NaN
                too_many.append(f"task {t.name!r}: none of its {rendered.rows} rows can be scored "
                                f"({t.data_source(None, data_dir)})")
        unscorable[t.name] = len(rendered.unscorable)
        exs = rendered.examples
        if chat_template:  # the answer is the assistant's turn: no delimiter after the template's own cue
            exs = [replace(e, input=chat_prompt(tok, e.input), target_delimiter="") for e in exs]
        items[t.name] = _prepare(t, chosen[t.name], exs, tok, max_len, model_fp, where)
    if too_many:
        raise EvalError("\n".join(too_many))
    todo = {name: [i for i in its if not all(k in cache for k in i.keys)] for name, its in items.items()}
    n_cached = sum(len(items[n]) - len(todo[n]) for n in items)
    chunks = [c for t in selected for c in make_chunks(todo[t.name], t.scoring, chunk_size)]
    remaining = {name: len(v) for name, v in todo.items()}
    metrics: dict[str, dict] = {}
    seconds = {name: 0.0 for name in items}  # wall time of each task's chunks (with replicas: between results)
    timing: dict[str, dict] = {}
    prompt_format = "chat" if chat_template else "raw"

    def finish_task(t: Task):
        rows = [example_row(t, i, cache, model_fp, label) for i in items[t.name]]
        metrics[t.name] = task_metrics(t, rows, model_fp, label, unscorable[t.name], prompt_format)
        n, sec = len(todo[t.name]), seconds[t.name]
        timing[t.name] = {"computed": n, "cached": len(items[t.name]) - n, "seconds": round(sec, 3),
                          "examples_per_s": round(n / sec, 3) if n and sec > 0 else None}
        if out is not None:
            write_parquet_atomic(pa.Table.from_pylist(rows), out / "examples" / f"{t.name}.parquet")
            ordered = [metrics[x.name] for x in selected if x.name in metrics]
            write_parquet_atomic(pa.Table.from_pylist(ordered), out / "metrics.parquet")
            write_json_atomic(ordered, out / "metrics.json")
            write_json_atomic(timing, out / "timing.json")  # this run's, apart from the results

    by_name = {t.name: t for t in selected}
    for t in selected:
        if remaining[t.name] == 0:
            finish_task(t)

    last = [time.perf_counter()]

    def on_done(chunk: Chunk, results: list):
        for item, res in zip(chunk.items, results):  # before anything of the chunk is cached or written
            check_finite(chunk.kind, item, res, label)
        now = time.perf_counter()
        seconds[chunk.items[0].task] += now - last[0]
        last[0] = now
        cache.add(cache_rows(chunk, results, tok))
        for it in chunk.items:
            remaining[it.task] -= 1
        for name in {it.task for it in chunk.items}:
            if remaining[name] == 0:
                finish_task(by_name[name])

    n_examples = sum(len(c.items) for c in chunks)
    t0 = time.perf_counter()
    if chunks:
        last[0] = t0
        bar = _bar(n_examples, progress)
        kw = dict(device=device, dtype=dtype, max_length=max_len, **(backend_kw or {}))
        if in_process:
            own = engine is None
            engine = engine or make_backend(backend, model_dir, **kw)
            last[0] = time.perf_counter()  # loading the model is no task's time
            try:
                for c in chunks:
                    on_done(c, run_chunk(engine, c.kind, [i.request for i in c.items]))
                    bar.update(len(c.items))
            finally:
                if own and hasattr(engine, "close"):
                    # vLLM's engine processes stopped now, not by interpreter-exit hooks (which can abort the
                    # process after a complete run)
                    engine.close()
        else:
            run_on_replicas(chunks, on_done, backend, model_dir, kw, replicas=replicas, address=address,
                            num_cpus=num_cpus_per_replica, num_gpus=num_gpus_per_replica, bar=bar)
        bar.close()
    elapsed = time.perf_counter() - t0
    log.info("evaluated %d examples (%d cached) in %.1f s", n_examples, n_cached, elapsed)
    return {"metrics": [metrics[t.name] for t in selected], "timing": timing, "computed": n_examples,
            "cached": n_cached, "seconds": elapsed, "model_fingerprint": model_fp, "out": str(out) if out else None}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # tqdm shows examples, examples/s and the ETA
    return tqdm(total=total, unit="ex", desc="eval", disable=not enabled, smoothing=0.1)
