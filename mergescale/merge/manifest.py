"""What a merged model records about its run: the key that a partial output must match to be resumed, the
manifest (`mergescale_manifest.json`) and the output's config.json changes. No torch here (a Ray driver uses it)."""

from __future__ import annotations

import hashlib
import json
import time

import mergescale
from mergescale.config import MergeConfig
from mergescale.merge.inputs import MergeInputs, MergePlan


def run_key(config: MergeConfig, inputs: MergeInputs, plan: MergePlan) -> str:
    """Identity of a run: a partial output is resumed only by a run with the same config, inputs and layout."""
    h = hashlib.sha256()
    h.update(json.dumps(config.model_dump(mode="json", exclude={"out", "cluster", "read", "write"}),
                        sort_keys=True).encode())
    h.update(json.dumps([c.fingerprint() for c in inputs.all], sort_keys=True).encode())
    h.update(plan.layout.fingerprint().encode())
    return h.hexdigest()


def build_manifest(config: MergeConfig, inputs: MergeInputs, plan: MergePlan, global_thresholds: dict | None,
                   timing: dict, warnings: list[str], extra: dict | None = None) -> dict:
    """`global_thresholds`: MergeStats.global_thresholds() (per-tensor thresholds are too many to list)."""
    def model_entry(c):
        return {"path": str(c.path), "files": c.fingerprint()}

    return {
        "mergescale_version": mergescale.__version__,
        "created_unix": time.time(),
        "config": config.model_dump(mode="json", by_alias=True),
        "inputs": {
            "base": model_entry(inputs.base) if inputs.base is not None else None,
            "experts": [model_entry(c) for c in inputs.experts],
        },
        "plan": {"tensors": len(plan.tensors), "units": len(plan.units), "bytes_written": plan.write_bytes},
        "global_thresholds": global_thresholds or None,
        "timing": timing,
        "warnings": list(dict.fromkeys(warnings)),  # a unit read by several passes warns once
        **(extra or {}),
    }


def config_updates(config: MergeConfig) -> dict:
    """config.json changes for the output: its dtype when out_dtype overrides the base's."""
    return {"dtype": config.out_dtype} if config.out_dtype else {}
