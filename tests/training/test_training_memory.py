"""The trainer keeps freed memory in glibc's heap (engine.keep_freed_memory): a CPU step no longer faults its
buffers in afresh, and the training it runs is bit for bit the one without it.

Each run is its own process (the setting is process-wide), one rank on gloo, the loop Ray Train workers run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from mergescale.eval.fixtures import write_fixture_data
from mergescale.tiny import build_tiny_llama
from tests.helpers import free_port, load_sd

pytestmark = [pytest.mark.deepspeed]

CHILD = r"""
import json, os, resource, sys
from pathlib import Path
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch
torch.set_num_threads(1)
from mergescale.training import engine as E, trainer
from mergescale.training.config import TrainConfig, deepspeed_json
from mergescale.training.recipes import prepare_data

cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
if sys.argv[2] == "off":  # the trainer as it was before: glibc's default mmap/trim behaviour
    E.keep_freed_memory = lambda: False
sources, val, info = prepare_data("expert", cfg)
out = Path(cfg.out)
trainer.run_worker("expert", cfg, sources, val, info, deepspeed_json(cfg.deepspeed), out,
                   out.with_name(out.name + "-work"), torch.device("cpu"), False, False)
for _ in range(2):  # the first 64 MB buffers may grow the heap (fresh pages): not counted
    torch.ones(1 << 24).sum()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(1 << 24).sum()  # 64 MB allocated and freed again, as a step's logits or flat gradients are
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _train(cfg: dict, malloc: str) -> tuple[list[dict], int]:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), malloc, str(free_port())], check=False,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    faults = int(next(line for line in r.stdout.splitlines() if line.startswith("FAULTS ")).split()[1])
    out = Path(cfg["out"])
    rows = [json.loads(x) for x in (out.with_name(out.name + "-work") / "metrics.jsonl").read_text().splitlines()]
    return rows, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_trains_the_same_weights_without_refaulting(tmp_path):
    base = build_tiny_llama(tmp_path / "base", seed=0)
    data = write_fixture_data(tmp_path / "data", "held-in:sentiment", n=32)
    cfg = {"base": str(base), "tasks": ["held-in:sentiment"], "data_dir": str(data), "max_steps": 3, "batch_size": 4,
           "micro_batch_size": 4, "lr": 3e-3, "optimizer": "adamw", "warmup_steps": 1, "max_input_len": 64,
           "max_output_len": 16, "seed": 0, "dropout": 0.1, "deepspeed": "zero2", "checkpoint_every": 100}
    before, faults_before = _train({**cfg, "out": str(tmp_path / "before")}, "off")
    after, faults_after = _train({**cfg, "out": str(tmp_path / "after")}, "on")
    assert [r["loss"] for r in after] == [r["loss"] for r in before] and len(after) == 3
    sd_before, sd_after = load_sd(tmp_path / "before"), load_sd(tmp_path / "after")
    assert sd_after.keys() == sd_before.keys()
    assert all(torch.equal(sd_after[k], sd_before[k]) for k in sd_before)
    # glibc's default maps each 64 MB buffer afresh (16,384 pages faulted in per allocation); kept, the heap serves
    # them from pages it already has (at most one more buffer's worth while its free chunks settle)
    assert faults_before >= 8 * 16_000 > 3 * faults_after
