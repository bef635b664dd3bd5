"""Task registry, fixtures, metrics and the paper's normalization (no model needed)."""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter

import pytest

from mergescale.eval import aggregate as agg
from mergescale.eval.fixtures import write_fixture_data
from mergescale.eval.scoring import exact_match, f1_score, rouge_l
from mergescale.eval.tasks import TaskError, all_tasks, get_task, register_tasks, tasks_for
from tests.helpers import REPO

HELD_IN = {"multiple_choice_qa": {"dream", "cosmos_qa"}, "extractive_qa": {"adversarial_qa", "ropes"},
           "closed_book_qa": {"hotpot_qa", "wiki_qa"}, "sentiment": {"app_reviews", "imdb"},
           "topic_classification": {"ag_news", "dbpedia_14"}, "structure_to_text": {"common_gen", "wiki_bio"},
           "summarization": {"cnn_dailymail", "xsum"}, "paraphrase_identification": {"mrpc", "qqp"}}
HELD_OUT = {"sentence_completion": {"copa", "hellaswag"}, "nli": {"anli", "rte"},
            "coreference": {"wsc", "winogrande"}, "word_sense_disambiguation": {"wic"}}


def _by_cat(tasks):
    out: dict[str, set] = {}
    for t in tasks:
        out.setdefault(t.category, set()).add(t.name)
    return out


def test_registry_matches_paper():
    assert _by_cat(tasks_for("held-in")) == HELD_IN
    assert _by_cat(tasks_for("held-out")) == HELD_OUT
    for t in all_tasks():
        assert t.hf_id and t.eval_split and t.train_split and t.templates
        assert t.scoring == ("rank" if t.metric == "accuracy" else "generate")
    assert {t.metric for t in tasks_for("summarization,structure_to_text")} == {"rouge_l"}


def test_selectors_and_unknown():
    assert [t.name for t in tasks_for("held-in:sentiment,copa,imdb")] == ["app_reviews", "imdb", "copa"]
    assert {t.name for t in tasks_for("nli")} == {"anli", "rte"}
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(TaskError, match="unknown task or selector 'held-in:nope'|no held_in category 'nope'"):
        tasks_for("held-in:nope")


def test_every_task_renders_fixture_rows(tmp_path):
    write_fixture_data(tmp_path, "all", n=6)
    for t in all_tasks():
        exs = list(t.prompted(data_dir=tmp_path))
        assert exs, t.name
        for e in exs:
            assert e.input and e.target
            if t.scoring == "rank":
                assert e.choices[e.label] == e.target
            else:
                assert e.references
        pairs = t.training_pairs(data_dir=tmp_path)
        assert pairs and all(i and o for i, o in pairs)
    # anli's eval split is three dev rounds concatenated
    assert len(get_task("anli").load(data_dir=tmp_path)) == 18


def test_missing_data_error_names_task_and_files(tmp_path):
    with pytest.raises(TaskError) as e:
        get_task("rte").load(data_dir=tmp_path)
    msg = str(e.value)
    assert "'rte'" in msg and str(tmp_path / "rte" / "validation.parquet") in msg
    assert "validation.jsonl" in msg and "Provide" in msg


def test_user_task_from_yaml(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"q": "is it red", "y": 1}\n{"q": "is it blue", "y": 0}\n')
    (tmp_path / "mine.yaml").write_text(
        "tasks:\n"
        "  - name: my_yesno\n    category: custom_cat\n    data_files: {validation: d.jsonl}\n"
        "    templates:\n      - name: t\n        jinja: 'Q: {{ q }}? ||| {{ answer_choices[y] }}'\n"
        "        answer_choices: no ||| yes\n")
    (t,) = register_tasks(tmp_path / "mine.yaml")
    exs = list(get_task("my_yesno").prompted())
    assert [(e.input, e.choices, e.label) for e in exs] == [("Q: is it red?", ("no", "yes"), 1),
                                                             ("Q: is it blue?", ("no", "yes"), 0)]
    assert tasks_for("custom_cat") == [t]
    (tmp_path / "bad.yaml").write_text("tasks:\n  - name: x\n    category: c\n    metric: bleu\n    templates: []\n")
    with pytest.raises(TaskError, match="metric 'bleu'"):
        register_tasks(tmp_path / "bad.yaml")


# -- metrics against independent implementations ---------------------------------------------------------------
def _norm(s):
    s = "".join(c for c in s.lower() if c not in string.punctuation)
    return " ".join(w for w in s.split() if w not in ("a", "an", "the"))


def _lcs_bruteforce(a, b):
    # longest common subsequence by enumerating subsequences of the shorter list (small inputs only)
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    for k in range(len(short), 0, -1):
        for idx in itertools.combinations(range(len(short)), k):
            sub, it = [short[i] for i in idx], iter(long_)
            if all(any(x == y for y in it) for x in sub):
                return k
    return 0


@pytest.mark.parametrize("pred,refs", [
    ("The cat sat on the mat", ["a cat sat on a mat", "dogs run"]),
    ("Paris, France!", ["paris"]), ("", ["something"]), ("x y z", ["z y x"]),
    ("police killed the gunman", ["police kill the gunman", "the gunman was killed by police"]),
])
def test_generation_metrics(pred, refs):
    em = max(float(_norm(pred) == _norm(r)) for r in refs)
    f1s = []
    for r in refs:
        p, g = _norm(pred).split(), _norm(r).split()
        same = sum((Counter(p) & Counter(g)).values())
        f1s.append(0.0 if not (p and g and same) else 2 * same / (len(p) + len(g)))
    assert exact_match(pred, refs) == em
    assert f1_score(pred, refs) == pytest.approx(max(f1s))
    rl = []
    for r in refs:
        p, g = re.findall(r"[a-z0-9]+", pred.lower()), re.findall(r"[a-z0-9]+", r.lower())
        lcs = _lcs_bruteforce(p, g) if p and g else 0
        rl.append(0.0 if not lcs else 2 * lcs / (len(p) + len(g)))
    assert rouge_l(pred, refs) == pytest.approx(max(rl))


def test_normalization_and_aggregation():
    merged = {"imdb": 0.8, "app_reviews": 0.3, "ag_news": 0.9}
    experts = {"sentiment": {"imdb": 0.9, "app_reviews": 0.6}, "topic_classification": {"ag_news": 0.6}}
    ref = agg.held_in_reference(experts, merged)
    perf = agg.normalized_performance(merged, ref)
    assert perf["tasks"] == pytest.approx({"imdb": 0.8 / 0.9, "app_reviews": 0.5, "ag_news": 1.5})
    assert perf["categories"] == pytest.approx({"sentiment": (0.8 / 0.9 + 0.5) / 2, "topic_classification": 1.5})
    assert perf["average"] == pytest.approx(((0.8 / 0.9 + 0.5) / 2 + 1.5) / 2)
    # held-out: by the base model; then mean over seeds of the per-seed averages
    base = {"copa": 0.5, "rte": 0.4, "anli": 0.2}
    s1 = agg.normalize({"copa": 0.6, "rte": 0.4, "anli": 0.3}, base)
    s2 = agg.normalize({"copa": 0.5, "rte": 0.5, "anli": 0.2}, base)
    per_seed = [(1.2 + (1.0 + 1.5) / 2) / 2, (1.0 + (1.25 + 1.0) / 2) / 2]
    assert agg.aggregate_seeds([s1, s2]) == pytest.approx(sum(per_seed) / 2)
    with pytest.raises(ValueError):
        agg.normalize({"copa": 0.5}, {"copa": 0.0})


def test_a_nan_score_is_not_normalized():
    # before: nan / 0.5 went into the category mean and the average as nan
    with pytest.raises(ValueError, match=r"score for task 'copa' is nan; a normalized average needs finite scores"):
        agg.normalize({"copa": float("nan"), "rte": 0.5}, {"copa": 0.5, "rte": 0.5})


def test_labels_that_do_not_parse_are_not_guessed(tmp_path):
    """Before: hellaswag's `label | int` made "x" choice 0, and winogrande's `else` made an unlabelled row's
    answer option2: both scored as if labelled."""
    write_fixture_data(tmp_path, "hellaswag,winogrande", n=4)
    hs, wg = get_task("hellaswag"), get_task("winogrande")
    rows = list(hs.load(data_dir=tmp_path))
    bad = [dict(rows[0], label="x"), *rows[1:]]
    assert [e.example_id for e in hs.prompted(dataset=bad, data_dir=tmp_path)] == ["1", "2", "3"]
    assert hs.render_rows(bad, data_dir=tmp_path).unscorable == [
        ("0", "template 'complete_first_then' cannot render it: 'x' is not an integer")]
    rows = list(wg.load(data_dir=tmp_path))
    bad = [dict(r, answer="") if i == 1 else r for i, r in enumerate(rows)]
    assert [e.example_id for e in wg.prompted(dataset=bad, data_dir=tmp_path)] == ["0", "2", "3"]
    rendered = wg.render_rows(bad, data_dir=tmp_path)
    assert rendered.unscorable == [("1", "no target (an unlabelled row)")] and rendered.rows == 4


def test_readme_task_yaml_example_registers(tmp_path):
    """The complete task YAML the README documents loads as written (so the documented schema stays true)."""
    import re

    from mergescale.eval.tasks import register_tasks, tasks_for

    readme = (REPO / "README.md").read_text()
    block = re.search(r"### Task YAML.*?```yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my_reviews").mkdir()
    for split in ("train", "test"):
        (tmp_path / "my_reviews" / f"{split}.jsonl").write_text('{"text": "great fun", "label": 1}\n')
    (tmp_path / "tasks.yaml").write_text(block)
    (task,) = register_tasks(tmp_path / "tasks.yaml")
    assert [t.name for t in tasks_for("held-in:sentiment")] == ["my_reviews"]
    (ex,) = task.prompted()
    assert (ex.input, ex.target, ex.choices) == ("great fun Did the reviewer like it?", "good", ("bad", "good"))
