"""`mergescale merge` on the command line: dry run, a real merge, and exit code 2 with a clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mergescale.cli import main
from mergescale.merge.inputs import human_bytes
from tests.helpers import load_sd, no_output, shard_files


def write_cfg(tmp_path, family, **fields) -> Path:
    cfg = {"method": "ties", "base": str(family.base), "experts": family.expert_strs,
           "parameters": {"density": 0.3}, **fields}
    f = tmp_path / "merge.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def tensor_bytes(model_dir) -> tuple[int, int]:
    """(number of tensors, bytes of tensor data) from the safetensors headers."""
    n = total = 0
    for f in shard_files(model_dir):
        raw = f.read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        header.pop("__metadata__", None)
        n += len(header)
        total += sum(e - b for b, e in (h["data_offsets"] for h in header.values()))
    return n, total


def test_dry_run_prints_plan_and_writes_nothing(family, tmp_path, capsys):
    cfg = write_cfg(tmp_path, family)
    out = tmp_path / "out"
    before = sorted(tmp_path.iterdir())
    assert main(["merge", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    n, nbytes = tensor_bytes(family.base)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert f"{n} (" in lines["tensors"]
    assert human_bytes(4 * nbytes) in lines["bytes to read"]  # base + 3 experts
    assert human_bytes(nbytes) in lines["bytes to write"]
    assert "est. peak memory" in lines and "B" in lines["est. peak memory"]
    assert "1-3 threshold passes over the whole model" in text
    assert no_output(out) and sorted(tmp_path.iterdir()) == before


def test_dry_run_peak_memory_follows_tile_size(family, tmp_path, capsys):
    def peak(tile_mb):
        cfg = write_cfg(tmp_path, family, tile_mb=tile_mb)
        assert main(["merge", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("est. peak memory"))
        return line

    small, large = peak(0.001), peak(64)
    assert small != large


def test_merge_exits_zero(family, tmp_path, capsys):
    cfg = write_cfg(tmp_path, family)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "--out", str(out), "-q"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert set(load_sd(out)) == set(load_sd(family.base))
    assert (out / "mergescale_manifest.json").exists()
    # the output exists now: a rerun without --overwrite is an error, with it a success
    assert main(["merge", str(cfg), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "already exists" in err and "--overwrite" in err
    assert main(["merge", str(cfg), "--out", str(out), "-q", "--overwrite"]) == 0


def test_relative_out_in_config_is_next_to_the_config(family, tmp_path, capsys, monkeypatch):
    (tmp_path / "cfgdir").mkdir()
    cfg = write_cfg(tmp_path / "cfgdir", family, out="merged", method="average", parameters={})
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(cfg), "-q"]) == 0
    assert str(tmp_path / "cfgdir" / "merged") in capsys.readouterr().out
    assert (tmp_path / "cfgdir" / "merged" / "mergescale_manifest.json").exists()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"parameters": {"density": 1.5}}, "parameters.density"),
        ({"parameters": {"trim_scope": "bogus"}}, "parameters.trim_scope"),
        ({"tile_mb": 0}, "tile_mb"),
        ({"out_dtype": "int8"}, "out_dtype"),
        ({"method": "nope"}, "method"),
        ({"wat": 1}, "wat"),
    ],
)
def test_bad_config_exits_2(family, tmp_path, capsys, fields, fragment):
    cfg = write_cfg(tmp_path, family, **fields)
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and fragment in err
    assert no_output(out)


def test_missing_config_and_bad_input_exit_2(family, tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cfg = write_cfg(tmp_path, family, experts=[family.expert_strs[0], str(tmp_path / "missing")])
    assert main(["merge", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "expert 1" in err and str(tmp_path / "missing") in err
    assert no_output(tmp_path / "o")


def test_console_script(family, tmp_path):
    cfg = write_cfg(tmp_path, family, method="average", parameters={})
    exe = Path(sys.executable).parent / "mergescale"
    assert exe.exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([str(exe), "merge", str(cfg), "--out", str(tmp_path / "out"), "-q"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and (tmp_path / "out" / "mergescale_manifest.json").exists()
    bad = write_cfg(tmp_path, family, tile_mb=-1)
    res = subprocess.run([str(exe), "merge", str(bad), "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and "error:" in res.stderr and "tile_mb" in res.stderr
    assert no_output(tmp_path / "bad")
