"""DeepSpeed ZeRO training on Ray Train (CPU, gloo) with a tiny Llama: learning, ZeRO-2 vs ZeRO-3 equivalence,
the consolidated checkpoint (transformers, merge), and resume after a worker is killed.

Four short runs share one local Ray (2 CPUs). The first DeepSpeed init on a fresh machine compiles shm_comm
(about 2 minutes, cached afterwards); the runs themselves take about 30-45 s each.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

from mergescale.eval.fixtures import write_fixture_data  # noqa: E402
from mergescale.eval.tasks import register_tasks  # noqa: E402
from mergescale.merge.driver import run_merge  # noqa: E402
from mergescale.tiny import build_tiny_llama  # noqa: E402
from mergescale.training import train  # noqa: E402
from mergescale.training.data import collate, encode  # noqa: E402
from mergescale.training.engine import target_loss_sum  # noqa: E402
from mergescale.training.trainer import FAIL_ENV  # noqa: E402
from tests.helpers import load_f32  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

# Learnable: the target is a word of the input, so a 2-layer model can drive the loss well below the base's.
ECHO_TASK = """
tasks:
  - name: echo_word_train_test
    category: echo
    group: custom
    metric: exact_match
    train_split: train
    eval_split: validation
    templates:
      - name: echo
        jinja: "Repeat the word: {{ word }} ||| {{ word }}"
    fixture: {word: word}
"""


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    from mergescale.cluster.session import ensure_ray

    assert ensure_ray(num_cpus=2) is True  # the embedded Ray, as the command line starts it
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "echo.yaml").write_text(ECHO_TASK)
    register_tasks(root / "echo.yaml", replace=True)
    data = write_fixture_data(root / "data", "echo_word_train_test", n=64)
    base = build_tiny_llama(root / "base", seed=0)
    return root, base, data


def _cfg(base, data, **kw):
    cfg = {"base": str(base), "tasks": ["echo_word_train_test"], "data_dir": str(data), "max_steps": 8, "batch_size": 4,
           "micro_batch_size": 1, "lr": 3e-3, "optimizer": "adamw", "warmup_steps": 1, "checkpoint_every": 3,
           "max_input_len": 64, "max_output_len": 16, "seed": 0, "dropout": 0.0}
    cfg.update(kw)
    return cfg


# Validation every 4 steps; an improvement of 10 nats is impossible, so the second evaluation (step 8) stops the
# run early: 8 of 12 steps.
EARLY_STOP = {"max_steps": 12, "validation_size": 8, "eval_every": 4, "early_stop": {"patience": 1, "min_delta": 10.0}}


@pytest.fixture(scope="module")
def zero2_run(setup):
    root, base, data = setup
    out = root / "zero2"
    manifest = train("expert", _cfg(base, data, deepspeed="zero2", **EARLY_STOP), out=out, progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def dropout_run(setup):
    """Uninterrupted reference for the resume test, with dropout on (resume must replay the dropout masks)."""
    root, base, data = setup
    out = root / "dropout"
    manifest = train("expert", _cfg(base, data, deepspeed="zero2", dropout=0.1), out=out, progress=False)
    return out, manifest


def _target_loss(model_dir, examples) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    b = collate([encode(tok, i, t, 64, 16) for i, t in examples], tok.pad_token_id)
    with torch.no_grad():
        s = target_loss_sum(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    return s.item() / int((b["labels"][:, 1:] != -100).sum())


def test_loss_falls_and_checkpoint_is_complete(setup, zero2_run):
    root, base, data = setup
    out, manifest = zero2_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["tokens_per_s"] > 0 for r in rows)
    assert manifest["recipe"] == "expert" and manifest["steps"] == 8 and manifest["stopped_early"]
    assert manifest["final"]["train_loss"] == rows[-1]["loss"] and manifest["final"]["val_loss"] == rows[-1]["val_loss"]
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8] and manifest["data"]["validation_examples"] == 8
    assert manifest["config"]["lr"] == 3e-3 and len(manifest["data"]["fingerprint"]) == 64
    assert {"config.json", "tokenizer.json", "mergescale_manifest.json"} <= {p.name for p in out.iterdir()}
    assert not (root / ".zero2.train").exists()  # checkpoints removed after success
    # independent of the trainer's own logging: transformers loads the output and the loss on the training examples
    # (computed here) fell well below the base model's
    from mergescale.eval.tasks import get_task

    examples = get_task("echo_word_train_test").training_pairs(data_dir=data, limit=32)
    examples = [(i, " " + t) for i, t in examples]
    before, after = _target_loss(base, examples), _target_loss(out, examples)
    assert after < 0.75 * before, (before, after)  # 8 steps of 4 examples from a random init: ~5.5 -> ~3.5
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_no_placement_group_cleaner_on_a_ray_without_the_state_api(zero2_run):
    """Ray Train's cleaner actor asks the State API (the dashboard, which the embedded Ray does not run) whether the
    controller lives: there it could only warn each second and never clean. The trainings here start none."""
    from ray._private.state import actors

    classes = {a.get("ActorClassName") for a in actors().values()}
    assert "TrainController" in classes  # the listing sees Ray Train's actors
    assert "PlacementGroupCleaner" not in classes


def test_zero3_two_workers_matches_zero2_one_worker(setup, zero2_run):
    """Same seed and global batch (4): ZeRO-2 on 1 worker accumulates 4 micro-batches, ZeRO-3 on 2 workers 2 each.
    The loss is normalised by the global batch's target tokens, so both compute the same gradient up to float32
    summation order (different all-reduce / partition layouts), ~1e-7 relative per step. AdamW normalises each
    gradient element, so where an element's gradient is near zero that noise can move its update by a visible
    fraction of lr; summed over the model it stays far below the update itself. So: the difference must stay under
    3e-4 of the total weight change (the training signal; measured 1.5e-5) and every element within 1% of the
    largest move AdamW can make (lr per step x steps; measured 0.25%)."""
    root, base, data = setup
    out3 = root / "zero3"
    m3 = train("expert", _cfg(base, data, deepspeed="zero3", cluster={"workers": 2}, **EARLY_STOP), out=out3,
               progress=False)
    assert m3["steps"] == 8 and m3["world_size"] == 2
    # validation loss: each of the 2 ranks scores half of the held-out examples; the all-reduced mean must agree
    assert m3["final"]["val_loss"] == pytest.approx(zero2_run[1]["final"]["val_loss"], rel=1e-5)
    w0, w2, w3 = load_f32(base), load_f32(zero2_run[0]), load_f32(out3)
    assert set(w2) == set(w3) == set(w0)
    change = torch.cat([(w2[k] - w0[k]).flatten() for k in w0]).norm()
    diff = torch.cat([(w3[k] - w2[k]).flatten() for k in w0])
    assert change > 0.1
    assert diff.norm() < 3e-4 * change, (diff.norm(), change)
    assert diff.abs().max() < 0.01 * 3e-3 * 8


def test_checkpoint_merges(setup, zero2_run, dropout_run, tmp_path):
    root, base, data = setup
    # Two trained experts merged with task arithmetic; checked against the formula on the files
    other = dropout_run[0]
    cfg = {"base": str(base), "experts": [str(zero2_run[0]), str(other)], "method": "task_arithmetic",
           "parameters": {"lambda": 0.5}}
    run_merge(cfg, tmp_path / "merged", progress=False)
    w0, a, b, m = load_f32(base), load_f32(zero2_run[0]), load_f32(other), load_f32(tmp_path / "merged")
    for k in w0:
        torch.testing.assert_close(m[k], w0[k] + 0.5 * ((a[k] - w0[k]) + (b[k] - w0[k])), rtol=1e-6, atol=1e-6)


def test_resume_after_worker_killed(setup, dropout_run, monkeypatch):
    """The worker SIGKILLs itself right after the step-6 checkpoint; Ray Train restarts the worker group and the loop
    resumes from step 6. Data order (seed, step), lr (step) and dropout seeds (seed, step, rank) are functions of the
    step and DeepSpeed restores fp32 weights and optimizer state exactly, so the result must be bit-identical to
    the uninterrupted run (same world size, same ops in the same order)."""
    root, base, data = setup
    out = root / "resumed"
    monkeypatch.setenv(FAIL_ENV, "5")
    manifest = train("expert", _cfg(base, data, deepspeed="zero2", dropout=0.1, cluster={"max_failures": 1}), out=out,
                     progress=False)
    assert manifest["resumed_from_step"] == 6 and manifest["steps"] == 8
    ref, got = load_f32(dropout_run[0]), load_f32(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (dropout_run[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_a_retry_removes_the_placement_group_its_killed_attempt_left(setup, tmp_path, monkeypatch):
    """Ray's OOM killer took a study's training driver, its Train controller and Train's placement-group cleaner
    at once: the group kept both CPUs reserved and the retried training waited for them forever (`ray status`: 0 of
    2 CPUs used, 2 reserved in placement groups, 2 groups pending). The workers now record their group in the run's
    work directory, and a retry removes it if it still holds resources."""
    import threading

    from ray.util import placement_group, placement_group_table

    from mergescale.cluster.train import PLACEMENT_GROUP
    from mergescale.training.api import TrainingFailed
    from mergescale.training.config import TrainConfig

    root, base, data = setup
    out = tmp_path / "out"
    cfg = _cfg(base, data, deepspeed="zero2", cluster={"max_failures": 0})
    monkeypatch.setenv(FAIL_ENV, "5")  # the first attempt dies after its step-6 checkpoint
    with pytest.raises(TrainingFailed):
        train("expert", cfg, out=out, progress=False)
    monkeypatch.delenv(FAIL_ENV)
    record = TrainConfig.model_validate(cfg).work_dir(out) / PLACEMENT_GROUP
    first = json.loads(record.read_text())["id"]
    assert first in placement_group_table()  # what the workers recorded is the group they ran in
    # as the OOM killer leaves it: the attempt's group alive, holding every CPU of this Ray
    left = placement_group([{"CPU": 2.0}])
    ray.get(left.ready(), timeout=120)
    record.write_text(json.dumps({"id": left.id.hex()}))
    result = {}
    retry = threading.Thread(target=lambda: result.update(m=train("expert", cfg, out=out, progress=False)),
                             daemon=True)
    retry.start()
    retry.join(timeout=600)
    if retry.is_alive():
        from ray.util import remove_placement_group

        remove_placement_group(left)  # let the stuck retry finish, so the module's other tests can run
        retry.join(timeout=600)
        pytest.fail("the retry waited for the CPUs its killed attempt's placement group held")
    assert result["m"]["resumed_from_step"] == 6 and result["m"]["steps"] == 8
    assert placement_group_table(left)["state"] == "REMOVED"


def test_non_finite_loss_stops_the_run_without_a_model(setup, tmp_path, capsys):
    """A base whose weights are NaN: the loss of step 1 is NaN, every worker stops there and the command exits 2
    naming the step (before: 8 steps of NaN loss, a NaN model written, exit 0)."""
    import yaml
    from safetensors.torch import load_file, save_file

    from mergescale.cli import main

    root, base, data = setup
    nan = tmp_path / "nan-base"
    shutil.copytree(base, nan)
    for f in nan.glob("*.safetensors"):
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(_cfg(nan, data, deepspeed="zero2", max_steps=4, out=str(tmp_path / "out"))))
    assert main(["train", "expert", str(config), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: the training loss is nan at step 1 (recipe expert, base {nan})" in err
    assert not (tmp_path / "out").exists()
