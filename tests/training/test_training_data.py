"""Training without Ray: config defaults and errors, the (seed, step) schedule, target-only loss, the leak check."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from mergescale.config import ConfigError
from mergescale.eval.fixtures import write_fixture_data
from mergescale.eval.tasks import get_task
from mergescale.training import engine as E
from mergescale.training import train
from mergescale.training.config import TrainConfig, load_train_config
from mergescale.training.data import IGNORE, MixtureSchedule, collate, encode
from mergescale.training.recipes import prepare_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("tdata"), "all", n=6)


def test_paper_defaults():
    c = TrainConfig(base="b", tasks=["held-in:sentiment"])
    assert (c.lr, c.max_steps, c.dropout, c.lr_schedule, c.optimizer) == (3e-5, 2000, 0.05, "cosine", "adafactor")
    assert (c.max_input_len, c.max_output_len) == (2048, 512)


def test_config_errors_name_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"learning_rate: unknown field"):
        load_train_config({"base": "b", "learning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"optimizer: .*'adafactor' or 'adamw'"):
        load_train_config({"base": "b", "optimizer": "sgd"})
    with pytest.raises(ConfigError, match=r"batch_size \(6\) must be a multiple of micro_batch_size \(2\) x "
                       r"cluster.workers \(2\)"):
        load_train_config({"base": "b", "batch_size": 6, "micro_batch_size": 2, "cluster": {"workers": 2}})
    p = tmp_path / "c.yaml"
    p.write_text("base: b\nmax_steps: -1\n")
    with pytest.raises(ConfigError, match=rf"invalid train config in {p}:\n  max_steps: Input should be greater"):
        load_train_config(p)


def test_lr_schedule_matches_formula():
    # cosine from 1e-3 to 1e-4 over 100 steps after 10 warmup steps, checked against the closed form
    for step in (0, 5, 9, 10, 40, 99):
        got = E.lr_at(step, 1e-3, 110, 10, "cosine", 0.1)
        cos = math.cos(math.pi * (step - 10) / 100)
        want = 1e-3 * (step + 1) / 10 if step < 10 else 1e-4 + 0.9e-3 * 0.5 * (1 + cos)
        assert got == pytest.approx(want, rel=1e-12)
    assert E.lr_at(50, 3e-5, 100, 0, "constant", 0.0) == 3e-5


def test_schedule_is_a_function_of_seed_and_step():
    sizes, cap = [50, 7, 300], 40
    a = MixtureSchedule(sizes, cap, seed=3)
    early = [a.batch(s, 8) for s in range(30)]
    fresh = MixtureSchedule(sizes, cap, seed=3)  # a resumed run: asks for step 25 first
    assert fresh.batch(25, 8) == early[25]
    assert MixtureSchedule(sizes, cap, seed=4).batch(0, 8) != early[0]
    # one mixture epoch holds min(n, cap) draws of each source, each example at most once
    # (examples-proportional, capped)
    epoch = [p for s in range(a.epoch_len // 8) for p in a.batch(s, 8)]
    counts = Counter(s for s, _ in epoch[: a.epoch_len - a.epoch_len % 8])
    assert a.epoch_len == 40 + 7 + 40
    assert counts[1] <= 7 and counts[0] <= 40 and counts[2] <= 40 and sum(counts.values()) >= 80
    full = a.epoch(0)
    assert Counter(full[:, 0].tolist()) == {0: 40, 1: 7, 2: 40}
    assert len({tuple(x) for x in full.tolist()}) == a.epoch_len
    assert all(0 <= i < sizes[s] for s, i in full.tolist())


def test_loss_is_on_target_tokens_only(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    pairs = [("the movie was great and i", " loved it"), ("question: what is the capital of france? answer:", " paris")]
    enc = [encode(tok, i, t, 2048, 512) for i, t in pairs]
    for (inp, tgt), (ids, labels) in zip(pairs, enc):
        n_in = len(tok(inp)["input_ids"])
        assert labels[:n_in] == [IGNORE] * n_in
        assert labels[n_in:] == tok(inp + tgt)["input_ids"][n_in:] + [tok.eos_token_id]
    b = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        ours = E.target_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                 b["labels"])
        # independent: transformers' own causal-LM loss (a token mean) per example, times its target tokens
        ref = 0.0
        for ids, labels in enc:
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            ref += out.loss.item() * sum(x != IGNORE for x in labels[1:])
    assert ours.item() == pytest.approx(ref, rel=1e-5)
    # truncation: input from the left, target from the right
    ids, labels = encode(tok, pairs[1][0], pairs[1][1] * 20, 5, 3)
    assert len(ids) == 8 and labels[:5] == [IGNORE] * 5 and labels[5:] != [IGNORE] * 3


def test_expert_and_multitask_data(data_dir):
    cfg = TrainConfig(base="b", tasks=["held-in:sentiment"], data_dir=str(data_dir), validation_size=2)
    train_src, val, info = prepare_data("expert", cfg)
    assert [s.name for s in train_src] == ["app_reviews", "imdb"] and len(val) == 2
    assert sum(s["examples"] for s in info["sources"]) + 2 == 12
    again = prepare_data("expert", cfg)[2]
    assert again["fingerprint"] == info["fingerprint"]
    with pytest.raises(ConfigError, match=r"span categories"):
        prepare_data("expert", cfg.model_copy(update={"tasks": ["imdb,ag_news"]}))
    multi = prepare_data("multitask", cfg.model_copy(update={"tasks": [], "mixture_cap": 3, "validation_size": 0}))[2]
    assert len(multi["sources"]) == 16 and all(s["rate"] == pytest.approx(1 / 16) for s in multi["sources"])


def test_task_files_replace_a_category_and_chat_prompts(base, data_dir, tmp_path):
    """A task file (train --tasks-yaml) replaces its category's built-in datasets; chat_template wraps every
    input in the tokenizer's template with the target as the assistant's answer; unknown tasks say how to add."""
    (tmp_path / "my").mkdir()
    (tmp_path / "my" / "train.jsonl").write_text("".join(json.dumps({"text": f"so good {i}", "label": 1}) + "\n"
                                                         for i in range(3)))
    (tmp_path / "tasks.yaml").write_text(
        "replace_categories: true\ntasks:\n  - name: my_reviews\n    category: sentiment\n    group: held_in\n"
        "    data_files: {train: my/train.jsonl}\n    templates:\n      - name: t\n"
        "        jinja: '{{ text }} Good or bad? ||| {{ answer_choices[label] }}'\n"
        "        answer_choices: bad ||| good\n")
    args = dict(base=str(base), tasks=["held-in:sentiment"], data_dir=str(data_dir))
    cfg = load_train_config(args, task_files=[str(tmp_path / "tasks.yaml")])
    sources, _, info = prepare_data("expert", cfg)
    assert [s.name for s in sources] == ["my_reviews"] and info["prompt_format"] == "raw"
    assert sources[0].examples[0] == ("so good 0 Good or bad?", " good")
    with pytest.raises(ConfigError, match="no chat template"):
        prepare_data("expert", cfg.model_copy(update={"chat_template": True}))
    chat_base = tmp_path / "chat_base"
    import shutil

    shutil.copytree(base, chat_base)
    (chat_base / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %} ->")
    chat = prepare_data("expert", cfg.model_copy(update={"chat_template": True, "base": str(chat_base)}))
    assert chat[2]["prompt_format"] == "chat" and chat[0][0].examples[0] == ("[so good 0 Good or bad?] ->", "good")
    assert chat[2]["fingerprint"] != info["fingerprint"]
    with pytest.raises(ConfigError, match="MERGESCALE_TASKS"):
        prepare_data("expert", cfg.model_copy(update={"tasks": ["no_such_task"]}))


def test_train_cli_passes_data_dir_and_task_files(monkeypatch):
    import mergescale.training.api as api
    from mergescale.cli import main

    seen = {}

    def fake_train(recipe, config, **kw):
        seen.update(kw)
        return {"final": {"val_loss": None, "train_loss": 1.0}, "config": {"out": "o"}, "recipe": recipe, "steps": 1}

    monkeypatch.setattr(api, "train", fake_train)
    assert main(["train", "expert", "c.yaml", "--data-dir", "d", "--tasks-yaml", "a.yaml", "--tasks-yaml",
                 "b.yaml"]) == 0
    assert seen["data_dir"] == "d" and seen["task_files"] == ["a.yaml", "b.yaml"]


def _train_args(base, data_dir, out, **kw):
    return {"base": str(base), "data_dir": str(data_dir), "out": str(out), **kw}


def test_instruct_refuses_leaking_task(base, data_dir, tmp_path):
    out = tmp_path / "it"
    with pytest.raises(ConfigError, match=r"instruct mixture leaks evaluation task 'copa'"):
        train("instruct", _train_args(base, data_dir, out, tasks=["copa"]))
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(json.dumps({"input": "x", "target": "y"}) + "\n"
                        + json.dumps({"input": "a", "target": "b", "task": "rte"}) + "\n")
    with pytest.raises(ConfigError, match=rf"leaks evaluation task 'rte': data file {labelled} has rows labelled"):
        train("instruct", _train_args(base, data_dir, out, data_files=[str(labelled)]))
    # a prompt copied from an evaluation set, without any task label: found by content
    wic = get_task("wic")
    row = next(iter(wic.load(wic.eval_split, data_dir)))
    p = wic.templates[0].render(row)
    copied = tmp_path / "copied.jsonl"
    copied.write_text(json.dumps({"input": "unrelated", "target": "ok"}) + "\n"
                      + json.dumps({"input": p.input, "target": p.target}) + "\n")
    with pytest.raises(ConfigError,
                       match=rf"leaks evaluation task 'wic': data file {copied} contains 1 of its prompts"):
        train("instruct", _train_args(base, data_dir, out, data_files=[str(copied)]))
    assert not out.exists() and not (tmp_path / ".it.train").exists()
    # a clean mixture passes the check (eval tasks limited to held-out so held-in tasks may be trained on)
    clean = TrainConfig(**_train_args(base, data_dir, out, tasks=["imdb"],
                                      data_files=[str(tmp_path / "labelled.jsonl")], eval_selectors=["held-out"]))
    (tmp_path / "labelled.jsonl").write_text(json.dumps({"input": "x", "target": "y"}) + "\n")
    srcs, _, _ = prepare_data("instruct", clean)
    assert [s.name for s in srcs] == ["imdb", str(tmp_path / "labelled.jsonl")]


def test_bad_input_fails_before_output(base, data_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"base: .*does not exist"):
        train("expert", _train_args(tmp_path / "nope", data_dir, out, tasks=["imdb"]))
    with pytest.raises(ConfigError, match=r"tasks: unknown task or selector 'nosuch'"):
        train("expert", _train_args(base, data_dir, out, tasks=["nosuch"]))
    with pytest.raises(ConfigError, match=r"recipe expert: 'tasks' must name exactly one"):
        train("expert", _train_args(base, data_dir, out, tasks=["imdb", "yelp"]))
    with pytest.raises(ConfigError, match=r"deepspeed: 'zero9' is neither"):
        train("expert", _train_args(base, data_dir, out, tasks=["imdb"], deepspeed="zero9"))
    with pytest.raises(ConfigError, match=r"data_files: .*missing.jsonl does not exist"):
        train("instruct", _train_args(base, data_dir, out, data_files=[str(tmp_path / "missing.jsonl")]))
    assert not out.exists() and not (tmp_path / ".o.train").exists()
