"""Bad evaluation input is an exit-2 error naming what is wrong, before anything is written; rows that cannot be
scored are counted, and fail the task unless allowed; a model whose log-probabilities are not finite gets no score.

Every case runs the command line (`mergescale eval`) on a tiny model and fixture data with one defect.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergescale.cli import main
from mergescale.eval.fixtures import write_fixture_data
from tests.helpers import error_line

TASKS = "copa,xsum"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("data"), TASKS, n=8)


def _rows(data_dir, task="copa", split="validation"):
    return [json.loads(x) for x in (data_dir / task / f"{split}.jsonl").read_text().splitlines()]


def _data_with(tmp_path, data_dir, rows=None, raw=None, task="copa", split="validation"):
    """A copy of the fixture data whose task file holds `rows` (or the text `raw`)."""
    root = tmp_path / "bad"
    shutil.copytree(data_dir, root)
    path = root / task / f"{split}.jsonl"
    path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return root, path


def _eval(model_dir, data, out, *args, tasks="copa"):
    return main(["eval", str(model_dir), "--tasks", tasks, "--data-dir", str(data), "--out", str(out),
                 "--max-length", "256", "-q", *args])


def test_template_column_missing_from_the_data_names_task_file_column_row(model_dir, data_dir, tmp_path, capsys):
    rows = _rows(data_dir)
    out = tmp_path / "out"
    # the column is missing from the whole file: before, choice2 rendered as "" and half the rows were scored
    data, path = _data_with(tmp_path, data_dir, [{k: v for k, v in r.items() if k != "choice2"} for r in rows])
    assert _eval(model_dir, data, out) == 2
    err = error_line(capsys)
    assert f"task 'copa': {path} has no column 'choice2', which template 'exercise' reads" in err
    assert not out.exists()
    # one row lacks it: the error names that row
    shutil.rmtree(data)
    data, path = _data_with(tmp_path, data_dir, [{k: v for k, v in r.items() if k != "choice2" or i != 5}
                                                 for i, r in enumerate(rows)])
    assert _eval(model_dir, data, out) == 2
    assert f"task 'copa': {path} row 5 has no value (null or absent) in column 'choice2'" in error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("case, n_bad, why", [
    ("label out of range", 1, "answer_choices[5] does not exist (the row has 2 answer choices)"),
    ("string labels", 8, "answer_choices['1'] does not exist"),
    ("all labels -1", 8, "no target (an unlabelled row)"),
    ("target not a choice", 1, "answer choices 0 and 1 are the same"),
])
def test_rows_that_cannot_be_scored_fail_the_task(model_dir, data_dir, tmp_path, capsys, case, n_bad, why):
    rows = _rows(data_dir)
    bad = {
        "label out of range": lambda i, r: dict(r, label=5) if i == 2 else r,
        "string labels": lambda i, r: dict(r, label=str(r["label"])),
        "all labels -1": lambda i, r: dict(r, label=-1),
        "target not a choice": lambda i, r: dict(r, choice2=r["choice1"]) if i == 2 else r,
    }[case]
    data, path = _data_with(tmp_path, data_dir, [bad(i, r) for i, r in enumerate(rows)])
    out = tmp_path / "out"
    assert _eval(model_dir, data, out) == 2
    err = error_line(capsys)
    assert f"task 'copa': {n_bad} of 8 rows cannot be scored" in err and "--max-unscorable" in err
    first = next(i for i, r in enumerate(rows) if bad(i, r) != r)
    assert f"{path} row {first}: {why}" in err
    assert not out.exists()


def test_unscorable_rows_allowed_are_counted_and_reported(model_dir, data_dir, tmp_path, capsys):
    rows = _rows(data_dir)
    data, _ = _data_with(tmp_path, data_dir, [dict(r, label=5) if i == 2 else r for i, r in enumerate(rows)])
    out = tmp_path / "out"
    assert _eval(model_dir, data, out, "--max-unscorable", "0.1") == 2  # 1 of 8 is more than a tenth
    assert "1 of 8 rows cannot be scored" in error_line(capsys)
    assert _eval(model_dir, data, out, "--max-unscorable", "0.125") == 0
    printed = capsys.readouterr().out
    assert any(line.split()[0] == "copa" and line.split()[-2:] == ["7", "1"] for line in printed.splitlines())
    (m,) = json.loads((out / "metrics.json").read_text())
    assert (m["n"], m["n_unscorable"]) == (7, 1)
    assert pq.read_table(out / "metrics.parquet").to_pylist()[0]["n_unscorable"] == 1
    scored = pq.read_table(out / "examples" / "copa.parquet").to_pylist()
    assert sorted(int(r["example_id"]) for r in scored) == [0, 1, 3, 4, 5, 6, 7]
    assert m["score"] == pytest.approx(sum(r["prediction"] == rows[int(r["example_id"])]["label"] for r in scored) / 7)
    # allowing every row still gives no score of zero rows (before: a score of nan, exit 0)
    shutil.rmtree(data)
    data, path = _data_with(tmp_path, data_dir, [dict(r, label=-1) for r in rows])
    assert _eval(model_dir, data, tmp_path / "none", "--max-unscorable", "1") == 2
    assert f"task 'copa': none of its 8 rows can be scored ({path})" in error_line(capsys)
    assert not (tmp_path / "none").exists()


def _nan_model(src, dst):
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("task", ["copa", "xsum"])
def test_non_finite_log_probabilities_are_an_error(model_dir, data_dir, tmp_path, capsys, task):
    nan = _nan_model(model_dir, tmp_path / "nan")
    out = tmp_path / "out"
    assert _eval(nan, data_dir, out, tasks=task) == 2  # before: copa 0.5 from [nan, nan]
    err = error_line(capsys)
    assert f"model {nan}: task '{task}', example" in err
    assert ("log-probabilities are [nan, nan]" if task == "copa" else "generating saw non-finite logits") in err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "limit must be >= 1, got 0"),
    (["--limit", "-3"], "limit must be >= 1, got -3"),
    (["--template", "nope"], "template 'nope': no selected task has it; their templates: 'copa': exercise"),
    (["--max-unscorable", "1.5"], "max_unscorable is a fraction of a task's rows, from 0 to 1; got 1.5"),
    (["--max-length", "0"], "max_length must be at least 2 tokens"),
    (["--max-length", "600"], "max_length 600 must be below the model's 512 positions"),
    (["--device", "cuda:7"], "device 'cuda:7': this machine has"),
    (["--device", "gpu"], "device 'gpu': "),
])
def test_bad_options_are_errors(model_dir, data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert _eval(model_dir, data_dir, out, *args) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_template_is_used_where_a_task_has_it_and_recorded(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(model_dir, data_dir, out, "--template", "nope", tasks=TASKS) == 2
    assert ("template 'nope': no selected task has it; their templates: 'copa': exercise; 'xsum': "
            "doc_write_summary_of_above") in error_line(capsys)
    assert not out.exists()
    # a name some tasks have: used there, the others keep their first template, and the metrics say which
    assert _eval(model_dir, data_dir, out, "--template", "exercise", "--limit", "2", tasks=TASKS) == 0
    used = {m["task"]: m["template"] for m in json.loads((out / "metrics.json").read_text())}
    assert used == {"copa": "exercise", "xsum": "doc_write_summary_of_above"}


def test_max_length_shorter_than_a_choice(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # two tokens cannot hold a choice of a COPA row; before: a ValueError traceback, exit 1
    assert main(["eval", str(model_dir), "--tasks", "copa", "--data-dir", str(data_dir), "--out", str(out),
                 "--max-length", "4", "-q"]) == 2
    err = error_line(capsys)
    assert f"task 'copa': {data_dir / 'copa' / 'validation.jsonl'} row 0" in err and "--max-length" in err
    assert not out.exists()
    # a generation task needs room for its new tokens
    assert _eval(model_dir, data_dir, out, "--max-length", "64", tasks="xsum") == 2
    assert "task 'xsum' generates up to 64 tokens" in error_line(capsys)


def test_empty_and_truncated_data_files(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    data, path = _data_with(tmp_path, data_dir, raw="")
    assert _eval(model_dir, data, out) == 2  # before: a StopIteration traceback
    assert f"task 'copa': {path} is empty" in error_line(capsys)
    text = "".join(json.dumps(r) + "\n" for r in _rows(data_dir))
    path.write_text(text[:-30])  # the last line cut short
    assert _eval(model_dir, data, out) == 2  # before: a DatasetGenerationError traceback
    assert f"task 'copa': cannot read {path}: line 8 is not valid JSON" in error_line(capsys)
    path.unlink()
    pq.write_table(_empty_parquet(), data / "copa" / "validation.parquet")
    assert _eval(model_dir, data, out) == 2
    assert f"task 'copa': {data / 'copa' / 'validation.parquet'} holds no rows" in error_line(capsys)
    assert not out.exists()


def _empty_parquet():
    import pyarrow as pa

    return pa.table({"premise": pa.array([], pa.string()), "label": pa.array([], pa.int64())})


def test_generation_is_plain_greedy_whatever_generation_config_says(model_dir, data_dir, tmp_path):
    """Before: transformers applied the model's generation_config.json (here no_repeat_ngram_size and a
    repetition penalty) to the hf backend's "greedy" generations, silently, where vLLM ignores it."""
    from mergescale.eval.backends import HFBackend
    from mergescale.eval.scoring import gen_request
    from mergescale.eval.tasks import get_task

    tweaked = tmp_path / "tweaked"
    shutil.copytree(model_dir, tweaked)
    gen_cfg = json.loads((tweaked / "generation_config.json").read_text())
    (tweaked / "generation_config.json").write_text(json.dumps({**gen_cfg, "no_repeat_ngram_size": 1,
                                                                "repetition_penalty": 3.0}))
    be = HFBackend(tweaked, max_length=128)
    reqs = [gen_request(be.tokenizer, e, 128, 12) for e in get_task("xsum").prompted(data_dir=data_dir)][:3]
    got = be.generate(reqs)
    eos = be.tokenizer.eos_token_id
    for req, toks in zip(reqs, got):  # independent: argmax of one unbatched forward pass per step
        ids, want = list(req.context), []
        with torch.no_grad():
            for _ in range(req.max_new_tokens):
                nxt = int(be.model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == eos:
                    break
                ids.append(nxt)
                want.append(nxt)
        assert toks == want
    assert any(len(set(t)) < len(t) for t in got)  # a repeated token: what the file's settings would forbid
