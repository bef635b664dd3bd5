"""HF backend and the evaluation runner on tiny local models and fixture data."""

from __future__ import annotations

import json
import random

import pyarrow.parquet as pq
import pytest
import torch

from mergescale.eval import evaluate
from mergescale.eval.backends import EvalError, HFBackend
from mergescale.eval.fixtures import write_fixture_data
from mergescale.eval.scoring import rank_request, split_context_choice
from mergescale.eval.tasks import PromptedExample, TaskError, register_tasks
from mergescale.tiny import build_tiny_llama

TASKS = "copa,rte,imdb,adversarial_qa"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # the CI box has 2 cores shared with other jobs: 2 OpenMP threads spin-wait each other (60x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("data"), TASKS, n=6)


@pytest.fixture(scope="module")
def backend(model_dir):
    return HFBackend(model_dir, max_length=48)


def _direct_logprob(model, ctx, cont):
    """Independent reference: one unbatched forward pass over context+choice, no cache, no padding."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
    return sum(float(lp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont))


def test_logprobs_equal_direct_forward_with_truncation(backend):
    tok = backend.tokenizer
    exs = [PromptedExample(str(i), "the movie was " * (1 + 3 * i) + "great. sentiment:", "x",
                           ("positive", "negative", "maybe yes no frog"), 0) for i in range(6)]
    reqs = [rank_request(tok, e, backend.max_length) for e in exs]
    got = backend.loglikelihood(reqs)
    longest = 0
    for e, r, g in zip(exs, reqs, got):
        for choice, c, k, v in zip(e.choices, r.contexts, r.continuations, g):
            full = tok(e.input + " " + choice)["input_ids"]
            assert c + k == full[-len(c + k):]  # left truncation only
            assert len(c + k) <= backend.max_length
            assert abs(_direct_logprob(backend.model, c, k) - v) <= 1e-4
        longest = max(longest, len(tok(e.input)["input_ids"]))
    assert longest > backend.max_length  # the truncation path was exercised


def test_token_boundary_moves_whitespace_into_choice(backend):
    tok = backend.tokenizer
    ctx, cont = split_context_choice(tok, "the movie was great. sentiment: ", "positive")
    assert ctx == tok("the movie was great. sentiment:")["input_ids"]
    assert ctx + cont == tok("the movie was great. sentiment: positive")["input_ids"]
    assert tok.decode(cont) == " positive"
    # naive per-part encoding gives other tokens (a lone space, and no leading-space token)
    naive = tok("the movie was great. sentiment: ")["input_ids"] + tok("positive")["input_ids"]
    assert naive != ctx + cont


def test_split_follows_lm_eval_where_a_merge_crosses_the_boundary(backend):
    """lm-eval's rule: condition on tok(context); the answer is tok(context + answer)[len(tok(context)):]. The
    log-probs equal one plain forward pass over exactly those tokens."""
    tok = backend.tokenizer
    cases = [("the mov", "ie was great"), ("capital of fr", "ance")]  # empty delimiters: merges span the cut
    for context, answer in cases:
        own = tok(context)["input_ids"]
        whole = tok(context + answer)["input_ids"]
        assert whole[:len(own)] != own  # a merge crosses the boundary: cutting `whole` would give another context
        ctx, cont = split_context_choice(tok, context, answer)
        assert ctx == own and cont == whole[len(own):]
        ex = PromptedExample("0", context, answer, (answer, "zebra"), 0, target_delimiter="")
        req = rank_request(tok, ex, backend.max_length)
        assert req.contexts[0] == own and req.continuations[0] == whole[len(own):]
        got = backend.loglikelihood([req])[0][0]
        assert abs(got - _direct_logprob(backend.model, own, whole[len(own):])) <= 1e-4


def _train(model, tok, texts, steps=80):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    enc = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    for step in range(steps):
        batch = random.Random(step).sample(enc, 16)
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=tok.pad_token_id)
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_accuracy_on_learnable_task(tmp_path):
    """A tiny model trained for a few steps on 'great'->positive / 'terrible'->negative must get the
    held-out fixture right: rank classification on a rule we can verify."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = build_tiny_llama(tmp_path / "m", seed=1, vocab_size=384)
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir)
    rng = random.Random(0)
    filler = "the movie was and i it team match".split()

    def row(label):
        words = [rng.choice(filler) for _ in range(6)]
        words.insert(rng.randrange(7), "great" if label else "terrible")
        return {"text": " ".join(words), "label": label}

    train = [row(i % 2) for i in range(64)]
    test = [row(i % 2) for i in range(20)]
    _train(model, tok, [f"review: {r['text']} sentiment: {['negative', 'positive'][r['label']]}" for r in train])
    mdir = tmp_path / "trained"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - name: toy_sentiment\n    category: toy\n    data_files: {validation: test.jsonl}\n"
        "    templates:\n      - name: t\n"
        "        jinja: 'review: {{ text }} sentiment: ||| {{ answer_choices[label] }}'\n"
        "        answer_choices: negative ||| positive\n")
    register_tasks(tmp_path / "t.yaml", replace=True)
    res = evaluate(mdir, tasks="toy_sentiment", out=tmp_path / "out", progress=False)
    (m,) = res["metrics"]
    assert m["n"] == 20 and m["acc"] == 1.0
    rows = pq.read_table(tmp_path / "out" / "examples" / "toy_sentiment.parquet").to_pylist()
    assert [r["prediction"] for r in rows] == [r["label"] for r in test]


def test_cache_resume_and_outputs(model_dir, data_dir, tmp_path):
    out = tmp_path / "out"
    first = evaluate(model_dir, tasks=TASKS, out=out, data_dir=data_dir, limit=3, max_length=256, progress=False)
    assert first["computed"] == 12 and first["cached"] == 0
    full = evaluate(model_dir, tasks=TASKS, out=out, data_dir=data_dir, max_length=256, progress=False)
    assert full["computed"] == 12 and full["cached"] == 12  # only the new examples ran
    again = evaluate(model_dir, tasks=TASKS, out=out, data_dir=data_dir, max_length=256, progress=False)
    assert again["computed"] == 0 and again["cached"] == 24
    assert again["metrics"] == full["metrics"]
    metrics = pq.read_table(out / "metrics.parquet").to_pylist()
    assert [m["task"] for m in metrics] == TASKS.split(",")
    assert not list(out.rglob("*.tmp"))
    # per-example rows agree with a fresh, uncached backend
    be = HFBackend(model_dir, max_length=256)
    rows = pq.read_table(out / "examples" / "copa.parquet").to_pylist()
    r0 = rows[0]
    from mergescale.eval.tasks import get_task

    ex = next(e for e in get_task("copa").prompted(data_dir=data_dir) if e.example_id == r0["example_id"])
    req = rank_request(be.tokenizer, ex, 256)
    ref = [_direct_logprob(be.model, c, k) for c, k in zip(req.contexts, req.continuations)]
    assert r0["logprobs"] == pytest.approx(ref, abs=1e-4)
    assert r0["n_tokens"] == [len(k) for k in req.continuations]
    assert r0["prediction"] == max(range(len(ref)), key=ref.__getitem__)
    gen = pq.read_table(out / "examples" / "adversarial_qa.parquet").to_pylist()
    assert all(set(g) >= {"generation", "f1", "exact_match", "rouge_l"} for g in gen)


def test_clear_errors_before_output(model_dir, data_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(TaskError, match="unknown task"):
        evaluate(model_dir, tasks="copa,nope", out=out, data_dir=data_dir)
    with pytest.raises(TaskError, match="'wic'.*no local data"):
        evaluate(model_dir, tasks="copa,wic", out=out, data_dir=data_dir)
    bad = build_tiny_llama(tmp_path / "small", seed=0, vocab_size=384, tokenizer=False)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 300
    (bad / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (bad / f).write_bytes((model_dir / f).read_bytes())
    with pytest.raises(EvalError, match="384 tokens but the model's embedding has 300 rows"):
        evaluate(bad, tasks="copa", out=out, data_dir=data_dir)
    assert not out.exists()


def test_cli(model_dir, data_dir, tmp_path, capsys):
    from mergescale.cli import main

    rc = main(["eval", str(model_dir), "--tasks", "rte", "--data-dir", str(data_dir), "--out", str(tmp_path / "o"),
               "--max-length", "256", "-q"])
    assert rc == 0 and "rte" in capsys.readouterr().out
    assert main(["eval", str(model_dir), "--tasks", "nope", "--data-dir", str(data_dir)]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_chat_template_prompts_recorded_and_timed(model_dir, data_dir, tmp_path):
    """--chat-template scores each input as the user's turn of the tokenizer's template (an independent
    apply_chat_template gives the same context tokens), records prompt_format, and times each task."""
    import shutil

    from transformers import AutoTokenizer

    chat_dir = tmp_path / "chat"
    shutil.copytree(model_dir, chat_dir)
    tmpl = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}<s>assistant:"
    (chat_dir / "chat_template.jinja").write_text(tmpl)
    with pytest.raises(EvalError, match="no chat template"):
        evaluate(model_dir, tasks="rte", data_dir=data_dir, chat_template=True, progress=False)
    res = evaluate(chat_dir, tasks="rte", data_dir=data_dir, out=tmp_path / "o", chat_template=True, progress=False)
    assert res["metrics"][0]["prompt_format"] == "chat"
    t = res["timing"]["rte"]
    assert t["computed"] == res["metrics"][0]["n"] and t["examples_per_s"] > 0
    assert json.loads((tmp_path / "o" / "timing.json").read_text())["rte"]["computed"] == t["computed"]
    rows = pq.read_table(tmp_path / "o" / "examples" / "rte.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(str(chat_dir))
    from mergescale.eval.tasks import get_task

    first = next(get_task("rte").prompted(data_dir=data_dir))
    want = tok.apply_chat_template([{"role": "user", "content": first.input}], tokenize=False,
                                   add_generation_prompt=True)
    assert want.startswith("<s>user: ") and want.endswith("<s>assistant:")
    backend = HFBackend(chat_dir)
    req = rank_request(tok, PromptedExample("0", want, first.target, first.choices, first.label, target_delimiter=""),
                       backend.max_length)
    scored = next(r for r in rows if r["example_id"] == first.example_id)
    assert scored["logprobs"] == pytest.approx(backend.loglikelihood([req])[0], abs=1e-4)
    raw = evaluate(chat_dir, tasks="rte", data_dir=data_dir, progress=False)
    assert raw["metrics"][0]["prompt_format"] == "raw"


def test_cpu_window_is_capped():
    from mergescale.eval.backends import CPU_MAX_LENGTH, model_max_length

    assert model_max_length({"max_position_embeddings": 8192}) == 8191
    assert model_max_length({"max_position_embeddings": 8192}, cap=CPU_MAX_LENGTH) == CPU_MAX_LENGTH
    assert model_max_length({"max_position_embeddings": 512}, cap=CPU_MAX_LENGTH) == 511
    assert model_max_length({"max_position_embeddings": 8192}, 4000, cap=CPU_MAX_LENGTH) == 4000


def test_accuracy_norm_metric_scores_by_log_prob_per_character(model_dir, data_dir, tmp_path):
    (tmp_path / "t.yaml").write_text(
        "tasks:\n  - name: copa_norm\n    category: sentence_completion\n    metric: accuracy_norm\n"
        f"    eval_split: validation\n    data_files: {{validation: {data_dir}/copa/validation.jsonl}}\n"
        "    templates:\n      - name: t\n        jinja: '{{ premise }} ||| {{ answer_choices[label] }}'\n"
        "        answer_choices: '{{ choice1 }} ||| {{ choice2 }}'\n")
    register_tasks(tmp_path / "t.yaml")
    res = evaluate(model_dir, tasks="copa_norm", out=tmp_path / "o", progress=False)
    (m,) = res["metrics"]
    rows = pq.read_table(tmp_path / "o" / "examples" / "copa_norm.parquet").to_pylist()
    by_char = [max(range(2), key=lambda j: (r["logprobs"][j] / len(r["choices"][j]), -j)) == r["label"] for r in rows]
    assert m["metric"] == "accuracy_norm" and m["score"] == pytest.approx(sum(by_char) / len(rows))
