"""Never a silently wrong result (issue 28, the merge's side): a resume over changed inputs, non-finite parameters
or results, `--overwrite` over a directory mergescale did not write, a full disk, bad `--workers`, a model without
config.json. Each is an exit-2 error naming what is wrong (or, for the resume, a fresh start that says why), and
nothing is written or lost."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml

from mergescale.checkpoint.output_dir import MANIFEST, partial_dir
from mergescale.checkpoint.read import Checkpoint
from mergescale.cli import main
from mergescale.config import load_config
from mergescale.merge import driver, local
from mergescale.merge.driver import run_merge
from tests.helpers import crash_merge, load_sd, no_output, replace_weights, shard_bytes


def write_cfg(tmp_path: Path, **cfg) -> Path:
    f = tmp_path / "merge.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def tree(d: Path) -> dict[str, bytes]:
    """Every file under d, by relative path, with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(["merge", *map(str, argv)])
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# 1. A resume must prove its inputs are the bytes its journal was made from


def copy_family(fam, root: Path):
    """Copies of the base and experts, so a test may replace one expert's shards."""
    experts = [shutil.copytree(e, root / f"e{i}") for i, e in enumerate(fam.experts)]
    return namedtuple("Fam", "base experts")(shutil.copytree(fam.base, root / "base"), experts)


@pytest.mark.parametrize("method, params, crash_at", [
    ("task_arithmetic", {"lambda": 0.7}, 25),  # journaled units only
    ("ties", {"density": 0.4, "trim_scope": "global"}, 25),  # journaled units and the saved statistics
    ("ties", {"density": 0.4, "trim_scope": "global"}, 1),  # the saved statistics only (no unit journaled)
])
def test_resume_over_replaced_expert_starts_over(micro, tmp_path, monkeypatch, caplog, method, params, crash_at):
    fam = copy_family(micro, tmp_path / "models")
    cfg = {"method": method, "base": str(fam.base), "experts": [str(e) for e in fam.experts], "parameters": params,
           "tile_mb": 700 / 2**20, "out_shard_size": "20KB"}
    out = tmp_path / "out"
    crash_merge(cfg, out, monkeypatch, crash_at)
    journal = partial_dir(out) / "done.journal"
    assert (journal.exists() and len(journal.read_text().split("\n")) - 1 == crash_at - 1) or crash_at == 1

    replace_weights(fam.experts[1], fam.experts[2])
    caplog.set_level(logging.WARNING)
    manifest = run_merge(cfg, out, progress=False)
    clean = run_merge(cfg, tmp_path / "clean", progress=False)  # the new inputs, from scratch
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")
    assert manifest["outputs"] == clean["outputs"]
    assert manifest["timing"]["units_resumed"] == 0
    said = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    assert len(said) == 1 and "expert 1" in said[0] and str(fam.experts[1]) in said[0], said
    assert not partial_dir(out).exists()


def test_resume_with_the_same_inputs_proves_and_keeps_the_work(micro, tmp_path, monkeypatch, caplog):
    """The proof costs a read of the journaled units, and nothing of the work they hold."""
    cfg = {"method": "ties", "base": str(micro.base), "experts": micro.expert_strs,
           "parameters": {"density": 0.4, "trim_scope": "global"}, "tile_mb": 700 / 2**20, "out_shard_size": "20KB"}
    out = tmp_path / "out"
    crash_merge(cfg, out, monkeypatch, 20)
    caplog.set_level(logging.INFO)
    manifest = run_merge(cfg, out, progress=False)
    assert manifest["timing"]["units_resumed"] == 19
    assert any("proving their inputs unchanged" in r.getMessage() for r in caplog.records)
    assert not any("starting over" in r.getMessage() for r in caplog.records)
    run_merge(cfg, tmp_path / "clean", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


def test_partial_output_of_an_older_journal_format_starts_over(micro, tmp_path, monkeypatch, caplog):
    """A journal without input digests (written before they were recorded) proves nothing: start over, say so."""
    cfg = {"method": "task_arithmetic", "base": str(micro.base), "experts": micro.expert_strs,
           "tile_mb": 700 / 2**20}
    out = tmp_path / "out"
    crash_merge(cfg, out, monkeypatch, 10)
    journal = partial_dir(out) / "done.journal"
    journal.write_text("".join(f"{line.split()[0]}\n" for line in journal.read_text().splitlines()))
    caplog.set_level(logging.WARNING)
    manifest = run_merge(cfg, out, progress=False)
    assert manifest["timing"]["units_resumed"] == 0
    assert any("done.journal" in r.getMessage() and "starting over" in r.getMessage() for r in caplog.records)


def test_a_start_killed_before_its_shards_existed_starts_over(micro, tmp_path, monkeypatch, caplog):
    """Killed between writing run.json and creating the shard files (seen as a study's merge killed mid-start):
    the rerun starts over instead of failing on the missing shard, and its output is a clean merge's."""
    cfg = {"method": "task_arithmetic", "base": str(micro.base), "experts": micro.expert_strs,
           "tile_mb": 700 / 2**20}
    out = tmp_path / "out"
    crash_merge(cfg, out, monkeypatch, 10)
    first = sorted(partial_dir(out).glob("*.safetensors"))[0]
    first.unlink()
    caplog.set_level(logging.WARNING)
    manifest = run_merge(cfg, out, progress=False)
    assert manifest["timing"]["units_resumed"] == 0
    assert any(first.name in r.getMessage() and "starting over" in r.getMessage() for r in caplog.records)
    run_merge(cfg, tmp_path / "clean", progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "clean")


# ------------------------------------------------------------------------------------------------------------
# 2. Non-finite parameters are config errors; non-finite results follow on_nonfinite


@pytest.mark.parametrize("field, value", [
    ("parameters.lambda", float("nan")), ("parameters.lambda", float("inf")), ("parameters.lambda", 1e40),
    ("experts.0.weight", float("nan")), ("experts.1.weight", -float("inf")), ("tile_mb", float("inf")),
    ("out_shard_size", float("inf")), ("cluster.num_cpus", float("inf")),
])
def test_non_finite_or_overflowing_settings_exit_2(family, tmp_path, capsys, field, value):
    cfg = {"method": "task_arithmetic", "base": str(family.base), "parameters": {}, "cluster": {},
           "experts": [{"path": e} for e in family.expert_strs[:2]]}
    *parents, leaf = field.split(".")
    node = cfg
    for k in parents:
        node = node[int(k)] if k.isdigit() else node[k]
    node[leaf] = value  # YAML: .nan, .inf, 1.0e+40
    if "weight" in field:
        cfg["method"] = "average"
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, **cfg), "--out", out, "-q")
    assert code == 2, err
    assert err.startswith("error:") and field in err, err
    assert no_output(out)


@pytest.mark.parametrize("method, weight, fields", [
    # 3e38 + 3e38 overflows float32 in the fused average kernel (the RMSNorm weights are 1)
    ("average", 3e38, {"parameters": {"normalize": False}}),
    # finite in float32, inf in a float16 output: the torch path
    ("task_arithmetic", 1.0, {"parameters": {"lambda": 3e38}, "out_dtype": "float16"}),
])
def test_merged_values_that_overflow_follow_on_nonfinite(family, tmp_path, capsys, method, weight, fields):
    experts = [{"path": e, "weight": weight} for e in family.expert_strs[:2]]
    cfg = {"method": method, "base": str(family.base), "experts": experts, **fields}
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, **cfg), "--out", out, "-q")
    assert code == 2, err
    assert "non-finite values" in err and "the merge produced" in err and "tensor '" in err and "on_nonfinite" in err
    assert no_output(out)
    # warn: written, and the manifest says where
    code, err = cli(capsys, write_cfg(tmp_path, **cfg, on_nonfinite="warn"), "--out", out, "-q")
    assert code == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    bad = {n for n, t in load_sd(out).items() if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    warned = {w.split("tensor '")[1].split("'")[0] for w in manifest["warnings"] if "the merge produced" in w}
    assert bad and warned == bad


# ------------------------------------------------------------------------------------------------------------
# 7. --overwrite replaces only an empty directory or a complete mergescale output


def user_dir(root: Path) -> Path:
    d = root / "out"
    (d / "notes").mkdir(parents=True)
    (d / "results.csv").write_text("a,b\n1,2\n")
    (d / "notes" / "todo.txt").write_text("keep me")
    return d


def merge_cfg(tmp_path, family) -> Path:
    return write_cfg(tmp_path, method="average", experts=family.expert_strs[:2])


def test_overwrite_refuses_a_directory_mergescale_did_not_write(family, tmp_path, capsys):
    out = user_dir(tmp_path)
    before = tree(out)
    code, err = cli(capsys, merge_cfg(tmp_path, family), "--out", out, "--overwrite", "-q")
    assert code == 2 and str(out) in err and "not a mergescale output" in err and "results.csv" in err, err
    assert tree(out) == before and not partial_dir(out).exists()


def test_overwrite_refuses_an_output_holding_other_files_or_missing_a_shard(family, tmp_path, capsys):
    cfg = merge_cfg(tmp_path, family)
    out = tmp_path / "out"
    assert cli(capsys, cfg, "--out", out, "-q")[0] == 0
    (out / "eval-results.json").write_text("{}")
    before = tree(out)
    code, err = cli(capsys, cfg, "--out", out, "--overwrite", "-q")
    assert code == 2 and str(out) in err and "eval-results.json" in err, err
    assert tree(out) == before
    (out / "eval-results.json").unlink()
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.unlink()
    before = tree(out)
    code, err = cli(capsys, cfg, "--out", out, "--overwrite", "-q")
    assert code == 2 and "not a complete mergescale output" in err and shard.name in err, err
    assert tree(out) == before and not partial_dir(out).exists()


def test_overwrite_replaces_an_empty_directory_or_a_complete_output(family, tmp_path, capsys):
    cfg = merge_cfg(tmp_path, family)
    out = tmp_path / "out"
    out.mkdir()
    assert cli(capsys, cfg, "--out", out, "--overwrite", "-q")[0] == 0
    first = tree(out)
    assert cli(capsys, write_cfg(tmp_path, method="average", experts=family.expert_strs[1:]), "--out", out,
               "--overwrite", "-q")[0] == 0
    assert tree(out) != first and (out / MANIFEST).exists()


def test_a_foreign_partial_directory_is_not_deleted(family, tmp_path, capsys):
    out = tmp_path / "out"
    foreign = partial_dir(out)
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x" * 100)
    code, err = cli(capsys, merge_cfg(tmp_path, family), "--out", out, "-q")
    assert code == 2 and str(foreign) in err and "not written by mergescale" in err, err
    assert tree(foreign) == {"data.bin": b"x" * 100} and not out.exists()


def test_output_appearing_during_the_merge_is_kept_and_so_is_the_work(family, tmp_path, capsys, monkeypatch):
    """Something created at the output path while merging, with --overwrite: not deleted; the finished merge is
    kept too, and the same command finishes it once the path is free."""
    cfg = merge_cfg(tmp_path, family)
    out = tmp_path / "out"
    real = driver.build_manifest

    def and_a_user_writes(*a, **k):
        user_dir(tmp_path)
        return real(*a, **k)

    monkeypatch.setattr(driver, "build_manifest", and_a_user_writes)
    code, err = cli(capsys, cfg, "--out", out, "--overwrite", "-q")
    assert code == 2 and "cannot move the merged output into place" in err and str(partial_dir(out)) in err, err
    assert "results.csv" in err and (out / "notes" / "todo.txt").read_text() == "keep me"
    monkeypatch.setattr(driver, "build_manifest", real)
    shutil.move(out, tmp_path / "moved")
    assert cli(capsys, cfg, "--out", out, "-q")[0] == 0
    clean = tmp_path / "clean"
    assert cli(capsys, cfg, "--out", clean, "-q")[0] == 0
    assert shard_bytes(out) == shard_bytes(clean)


def test_training_output_writer_shares_the_overwrite_rule(family, tmp_path):
    from transformers import AutoTokenizer

    from mergescale.errors import MergeInputError
    from mergescale.training.output import write_model

    out = user_dir(tmp_path)
    before = tree(out)
    sd = load_sd(family.base)
    with pytest.raises(MergeInputError, match="not a mergescale output"):
        write_model(sd, out, base=str(family.base), tokenizer=AutoTokenizer.from_pretrained(str(family.base)),
                    manifest={"data": {"fingerprint": "x"}}, metrics=None, shard_size=10**9, overwrite=True)
    assert tree(out) == before and not partial_dir(out).exists()


# ------------------------------------------------------------------------------------------------------------
# 8. A full disk: an error naming the file system and the bytes needed, before writing when it can be seen


def fake_free(monkeypatch, free: int) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - free, free))


def test_not_enough_space_is_an_error_before_anything_is_written(family, tmp_path, capsys, monkeypatch):
    from mergescale.checkpoint import output_dir

    cfg = merge_cfg(tmp_path, family)
    out = tmp_path / "out"
    code, text = main(["merge", str(cfg), "--out", str(out), "--dry-run"]), capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("disk space"))
    need = sum(Checkpoint(family.base).tensors[n].nbytes for n in Checkpoint(family.base).tensors)
    assert code == 0 and "to write" in line and "free on" in line
    fake_free(monkeypatch, need // 2)
    for extra in ([], ["--dry-run"]):
        code, err = cli(capsys, cfg, "--out", out, "-q", *extra)
        assert code == 2 and str(output_dir.mount_point(out)) in err and "not enough space" in err, err
        needed = int(err.split("(")[1].split(" bytes")[0])
        assert needed >= need and f"({need // 2} bytes) is free" in err
        assert no_output(out)


def test_disk_full_mid_merge_is_an_error_and_a_rerun_resumes(family, tmp_path, capsys, monkeypatch):
    from mergescale.checkpoint import output_dir
    from mergescale.merge.inputs import output_room, prepare
    from mergescale.merge.manifest import run_key

    cfg = write_cfg(tmp_path, method="task_arithmetic", base=str(family.base), experts=family.expert_strs,
                    tile_mb=0.01, write="buffered")
    out = tmp_path / "out"
    clean = tmp_path / "clean"
    assert cli(capsys, cfg, "--out", clean, "-q")[0] == 0
    total = sum(p.stat().st_size for p in clean.glob("*.safetensors"))
    real_pwrite, written = os.pwrite, {"n": 0}

    def filling_pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".safetensors"):
            written["n"] += len(data)
            if written["n"] > total // 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(local, "JOURNAL_EVERY_S", 0.0)
    monkeypatch.setattr(os, "pwrite", filling_pwrite)
    code, err = cli(capsys, cfg, "--out", out, "-q")
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert code == 2 and "no space left" in err and str(output_dir.mount_point(out)) in err, err
    needed = int(err.split("(")[1].split(" bytes")[0])
    config, _, inputs, plan = prepare(load_config(cfg), out, False)
    fresh = output_room(plan, inputs, tmp_path / "elsewhere", run_key(config, inputs, plan))[0]
    inputs.close()
    assert 0 < needed < fresh  # what is left to write, not the whole output again
    assert not out.exists() and (partial_dir(out) / "done.journal").exists()  # the finished units are kept
    assert cli(capsys, cfg, "--out", out, "-q")[0] == 0
    assert json.loads((out / MANIFEST).read_text())["timing"]["units_resumed"] > 0
    assert shard_bytes(out) == shard_bytes(clean)


# ------------------------------------------------------------------------------------------------------------
# 9, 13. --workers 0, a model without config.json


@pytest.mark.parametrize("workers", ["0", "-3"])
def test_workers_below_one_exit_2_before_ray_starts(family, tmp_path, capsys, workers):
    import sys

    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        code, err = cli(capsys, merge_cfg(tmp_path, family), "--out", out, "--workers", workers, *extra)
        assert code == 2 and "--workers" in err and "cluster.workers" in err and f"got {workers}" in err, err
        assert no_output(out)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


def test_expert_without_config_json_says_so(family, tmp_path, capsys):
    expert = shutil.copytree(family.experts[1], tmp_path / "expert")
    (expert / "config.json").unlink()
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, method="average", experts=[family.expert_strs[0], str(expert)]),
                    "--out", out)
    assert code == 2 and f"{expert}: no config.json" in err and "allow_architecture_mismatch" in err, err
    assert "differ" not in err
    assert no_output(out)
    cfg = write_cfg(tmp_path, method="average", experts=[family.expert_strs[0], str(expert)],
                    allow_architecture_mismatch=True)
    assert cli(capsys, cfg, "--out", out, "-q")[0] == 0  # the check skipped on request


# ------------------------------------------------------------------------------------------------------------
# The same class of failure where the issue did not look: values from model files and the output location


def test_model_config_that_is_not_an_object_exits_2(family, tmp_path, capsys):
    expert = shutil.copytree(family.experts[1], tmp_path / "expert")
    (expert / "config.json").write_text("[1, 2]")
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, method="average", experts=[family.expert_strs[0], str(expert)]),
                    "--out", out)
    assert code == 2 and str(expert / "config.json") in err and "JSON object" in err, err
    assert no_output(out)


def test_index_naming_a_shard_outside_the_model_directory_exits_2(family, tmp_path, capsys):
    """An index entry such as ../other/model-00001.safetensors would merge another model's bytes."""
    other = shutil.copytree(family.experts[2], tmp_path / "other")
    expert = shutil.copytree(family.experts[1], tmp_path / "expert")
    index = json.loads((expert / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    moved = {n: f"../other/{f}" for n, f in index["weight_map"].items() if f == shard}
    (expert / shard).unlink()
    index["weight_map"].update(moved)
    (expert / "model.safetensors.index.json").write_text(json.dumps(index))
    assert (other / shard).exists()
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, method="average", experts=[family.expert_strs[0], str(expert)]),
                    "--out", out)
    assert code == 2 and "model.safetensors.index.json" in err and f"../other/{shard}" in err, err
    assert f"which is not a file name in {expert}" in err  # (refused before too, as a tensor missing from a shard)
    assert no_output(out)


def test_header_with_negative_sizes_is_corrupt(tmp_path):
    from mergescale.checkpoint.read import CheckpointError, read_safetensors_header

    header = json.dumps({"w": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [16, 0]}}).encode()
    f = tmp_path / "model.safetensors"
    f.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header entry for tensor 'w'") as e:
        read_safetensors_header(f)
    assert str(f) in str(e.value)


def test_pickle_that_is_not_a_state_dict_exits_2(family, tmp_path, capsys):
    expert = tmp_path / "expert"
    expert.mkdir()
    shutil.copyfile(family.experts[1] / "config.json", expert / "config.json")
    torch.save([torch.zeros(2)], expert / "pytorch_model.bin")
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, method="average", experts=[family.expert_strs[0], str(expert)], allow_pickle=True)
    code, err = cli(capsys, cfg, "--out", out)
    assert code == 2 and str(expert / "pytorch_model.bin") in err and "not a state dict" in err, err
    assert no_output(out)


def test_tokenizer_source_with_a_broken_config_exits_2_before_merging(family, tmp_path, capsys):
    src = tmp_path / "tok"
    src.mkdir()
    shutil.copyfile(family.base / "tokenizer.json", src / "tokenizer.json")
    (src / "config.json").write_text("{not json")
    out = tmp_path / "out"
    code, err = cli(capsys, write_cfg(tmp_path, method="average", experts=family.expert_strs[:2],
                                      tokenizer_source=str(src)), "--out", out)
    assert code == 2 and "tokenizer_source" in err and str(src / "config.json") in err, err
    assert no_output(out)


def test_output_under_a_file_or_over_a_symlink_exits_2(family, tmp_path, capsys):
    cfg = merge_cfg(tmp_path, family)
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    code, err = cli(capsys, cfg, "--out", blocker / "merged")
    assert code == 2 and f"{blocker} is a file, not a directory" in err, err
    assert blocker.read_text() == "mine"
    target = user_dir(tmp_path / "t")
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    code, err = cli(capsys, cfg, "--out", link, "--overwrite")
    assert code == 2 and "symbolic link" in err, err
    assert link.is_symlink() and tree(target) == before


def test_nonfinite_scan_of_merged_tiles_counts_like_numpy():
    """kernels.count_nonfinite (64-bit words first, then a count) against numpy's isfinite, for bf16 bits and
    float32, any length and alignment, NaN/inf anywhere (the first, last, a word's every lane)."""
    import numpy as np

    from mergescale.merge.kernels import count_nonfinite

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(0, 70))
        x = rng.standard_normal(n + 1).astype(np.float32)
        for i in rng.integers(0, n + 1, int(rng.integers(0, 4))):
            x[i] = rng.choice([np.nan, np.inf, -np.inf])
        if trial % 7 == 0 and n:
            x[-1] = np.inf
        x = x[trial % 2:]  # odd starts: not 8-byte aligned
        bf16 = torch.from_numpy(x.copy()).to(torch.bfloat16)
        bits = bf16.view(torch.int16).numpy().view(np.uint16)
        assert count_nonfinite(x) == int((~np.isfinite(x)).sum())
        assert count_nonfinite(bits[trial % 3:]) == int((~torch.isfinite(bf16[trial % 3:])).sum())
