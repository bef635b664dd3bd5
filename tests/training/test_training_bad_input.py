"""Bad training input fails on the driver with an exit-2 error naming the file, column, row or field, before any
worker starts or anything is written; a resume loads only checkpoint files mergescale sealed itself.

No Ray here: run_training (the Ray launch) is replaced by a stand-in, which these tests either must not reach, or
use to leave a sealed checkpoint behind as a crashed run would.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

import mergescale.cluster.train as cluster_train
from mergescale.cli import main
from mergescale.cluster.train import TrainingFailed
from mergescale.config import ConfigError
from mergescale.eval.fixtures import write_fixture_data
from mergescale.training import train
from tests.helpers import error_line


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("tdata"), "imdb", n=6)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the run gets as far as starting workers."""
    def reached(*a, **k):
        raise AssertionError("validation passed and training started")

    monkeypatch.setattr(cluster_train, "run_training", reached)


def _config(tmp_path, base, data_dir, **fields) -> str:
    cfg = {"base": str(base), "tasks": ["imdb"], "data_dir": str(data_dir), "out": str(tmp_path / "expert"),
           "max_steps": 2, "batch_size": 1, "max_input_len": 64, "max_output_len": 16, **fields}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _nothing_written(tmp_path) -> bool:
    return not (tmp_path / "expert").exists() and not (tmp_path / ".expert.train").exists()


def _copy_with(tmp_path, data_dir, edit):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    path = root / "imdb" / "train.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(edit(i, r)) + "\n" for i, r in enumerate(rows)))
    return root, path


def test_data_file_missing_its_input_column(base, data_dir, tmp_path, capsys, no_training):
    """Before: the template rendered the missing `text` as "" and the run trained on empty prompts, exit 0."""
    data, path = _copy_with(tmp_path, data_dir, lambda i, r: {"label": r["label"]})
    assert main(["train", "expert", _config(tmp_path, base, data)]) == 2
    assert f"tasks: task 'imdb': {path} has no column 'text', which template" in error_line(capsys)
    assert _nothing_written(tmp_path)
    shutil.rmtree(data)
    data, path = _copy_with(tmp_path, data_dir, lambda i, r: {"label": r["label"]} if i == 3 else r)
    assert main(["train", "expert", _config(tmp_path, base, data)]) == 2
    assert f"tasks: task 'imdb': {path} row 3 has no value (null or absent) in column 'text'" in error_line(capsys)
    assert _nothing_written(tmp_path)


def test_training_rows_that_cannot_be_used_fail_unless_allowed(base, data_dir, tmp_path, capsys, no_training):
    data, path = _copy_with(tmp_path, data_dir, lambda i, r: dict(r, label=7) if i == 2 else r)
    assert main(["train", "expert", _config(tmp_path, base, data)]) == 2
    err = error_line(capsys)
    assert "task 'imdb': 1 of 6 rows cannot be scored, more than max_unscorable 0 allows" in err
    assert f"{path} row 2: answer_choices[7] does not exist" in err
    assert _nothing_written(tmp_path)
    with pytest.raises(AssertionError, match="training started"):  # allowed: validation passes
        train("expert", _config(tmp_path, base, data, max_unscorable=0.2))


def test_empty_and_truncated_training_files(base, data_dir, tmp_path, capsys, no_training):
    data, path = _copy_with(tmp_path, data_dir, lambda i, r: r)
    path.write_text("")
    assert main(["train", "expert", _config(tmp_path, base, data)]) == 2  # before: a StopIteration traceback
    assert f"tasks: task 'imdb': {path} is empty" in error_line(capsys)
    path.write_text(json.dumps({"text": "a", "label": 0}) + "\n" + '{"text": "b", "la')
    assert main(["train", "expert", _config(tmp_path, base, data)]) == 2
    assert f"cannot read {path}: line 2 is not valid JSON" in error_line(capsys)
    lines = tmp_path / "it.jsonl"
    lines.write_text(json.dumps({"input": "q", "target": "a"}) + "\n" + json.dumps({"input": " ", "target": "a"})
                     + "\n")
    assert main(["train", "instruct", _config(tmp_path, base, data, tasks=[], data_files=[str(lines)])]) == 2
    assert f"data_files: {lines}:2: field 'input' is empty" in error_line(capsys)
    assert _nothing_written(tmp_path)


def test_pickle_base_needs_allow_pickle(base, data_dir, tmp_path, capsys, no_training):
    import torch

    from tests.helpers import load_sd

    pickled = tmp_path / "pickled"
    shutil.copytree(base, pickled, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_sd(base), pickled / "pytorch_model.bin")
    # before: transformers unpickled it, where merge and eval refuse one
    assert main(["train", "expert", _config(tmp_path, pickled, data_dir)]) == 2
    err = error_line(capsys)
    assert f"base: {pickled}: holds only pickle checkpoints" in err and "allow_pickle: true" in err
    assert _nothing_written(tmp_path)
    with pytest.raises(AssertionError, match="training started"):
        train("expert", _config(tmp_path, pickled, data_dir, allow_pickle=True))


def _crash_after_a_checkpoint(monkeypatch):
    """A run that saved and sealed step 3, then died (as the workers would leave it)."""
    from mergescale.training import checkpoints as C

    def run(recipe, cfg, sources, val, info, ds_base, out, work, **kw):
        d = work / "checkpoints" / C.checkpoint_tag(3)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model states " * 100)
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer states " * 100)
        C.seal(d, info["fingerprint"], C.file_digests(d, C.checkpoint_files(d)))
        raise TrainingFailed("killed")

    monkeypatch.setattr(cluster_train, "run_training", run)


def test_resume_verifies_checkpoint_files_against_their_seal(base, data_dir, tmp_path, monkeypatch, no_training):
    from mergescale.training import checkpoints as C

    config = _config(tmp_path, base, data_dir)
    _crash_after_a_checkpoint(monkeypatch)
    with pytest.raises(TrainingFailed):
        train("expert", config)
    step = tmp_path / ".expert.train" / "checkpoints" / C.checkpoint_tag(3)
    model = step / "mp_rank_00_model_states.pt"
    good = model.read_bytes()
    resumed = []
    monkeypatch.setattr(cluster_train, "run_training", lambda *a, **k: resumed.append(a) or {"steps": 2})
    # same size, other bytes: DeepSpeed would torch.load(weights_only=False) it
    model.write_bytes(good.replace(b"model", b"evil!"))
    with pytest.raises(ConfigError, match=rf"resume: {model}: sha256 [0-9a-f]{{16}}\.\.\. differs from the one "
                                          "mergescale recorded when it saved the checkpoint"):
        train("expert", config)
    model.write_bytes(good)
    (step / "extra.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match=rf"resume: checkpoint {step} differs from what mergescale saved: files "
                                          "added: extra.pt"):
        train("expert", config)
    assert not resumed and not (tmp_path / "expert").exists()
    (step / "extra.pt").unlink()
    train("expert", config)  # intact: the run resumes
    assert len(resumed) == 1


def test_newest_checkpoint_without_a_seal_is_passed_over(tmp_path):
    from mergescale.training import checkpoints as C

    root = tmp_path / "checkpoints"
    sealed, cut_short = root / C.checkpoint_tag(3), root / C.checkpoint_tag(6)
    for d in (sealed, cut_short):
        d.mkdir(parents=True)
        (d / "states.pt").write_bytes(d.name.encode())
    C.seal(sealed, "fp", C.file_digests(sealed, ["states.pt"]))
    assert C.verified_resume_tag(root, "fp") == sealed.name
    with pytest.raises(C.CheckpointMismatch, match="was made with other training data"):
        C.verified_resume_tag(root, "other")
    (sealed / "states.pt").write_bytes(b"longer than before")
    with pytest.raises(C.CheckpointMismatch, match=rf"states.pt: 18 bytes, but {len(sealed.name)} when mergescale "
                       rf"saved it"):
        C.verified_resume_tag(root, "fp")
    assert C.verified_resume_tag(tmp_path / "none", "fp") is None


def test_checkpoint_dir_with_foreign_files_is_neither_deleted_nor_used(base, data_dir, tmp_path, capsys, no_training):
    mine = tmp_path / "my-files"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    # before: a checkpoint_dir without mergescale's run.json was deleted as "checkpoints of a different run"
    assert main(["train", "expert", _config(tmp_path, base, data_dir, checkpoint_dir=str(mine))]) == 2
    assert f"checkpoint_dir: {mine} holds files mergescale did not write" in error_line(capsys)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_deepspeed_json_fields_the_train_config_owns(base, data_dir, tmp_path, capsys, no_training):
    """Before: a DeepSpeed JSON's gradient_clipping (or batch sizes) was replaced by the train config's without a
    word, and an optimizer section clashed with the trainer's optimizer inside the workers (a traceback, exit 1)."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 0.5,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    assert main(["train", "expert", _config(tmp_path, base, data_dir, deepspeed=str(ds))]) == 2
    err = error_line(capsys)
    assert f"deepspeed: {ds} sets optimizer (set optimizer, lr, weight_decay in the train config); " in err
    assert "gradient_clipping (set grad_clip in the train config)" in err
    assert _nothing_written(tmp_path)


def test_lengths_and_tokenizer_must_fit_the_base(base, data_dir, tmp_path, capsys, no_training):
    """Before: both failed inside the workers (an index error) or ran on positions the model never saw."""
    assert main(["train", "expert", _config(tmp_path, base, data_dir, max_input_len=500, max_output_len=16)]) == 2
    assert ("max_input_len (500) + max_output_len (16) exceed the base model's 512 positions"
            in error_line(capsys))
    small = tmp_path / "small-vocab"
    shutil.copytree(base, small)
    cfg = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    assert main(["train", "expert", _config(tmp_path, small, data_dir)]) == 2
    err = error_line(capsys)
    assert f"base: the tokenizer at {small} has" in err and "but the base model's embedding has 100 rows" in err
    assert _nothing_written(tmp_path)
