"""Evaluate a merge without writing it: the merge is pushed into a model loaded once (eval.resident) and scored
there. `mergescale merge-eval CONFIG --tasks ...` runs one; a study keeps one resident per base across its cells
(mergescale.cluster.resident)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergescale.eval.resident import Resident

# backends whose models take pushed rows (hf: eval.resident; vllm: eval.vllm_resident). No torch at import: a
# study's plan reads this.
PUSH_BACKENDS = ("hf", "vllm")


def resident_source(config) -> Path:
    """The directory a resident model for `config`'s merges is loaded from: its base (else its first expert)."""
    from mergescale.config import load_config
    from mergescale.models.sources import resolve_model_dir

    config = load_config(config)
    return Path(resolve_model_dir(str(config.base if config.base is not None else config.experts[0].path)))


def load_resident(model_dir, backend: str = "hf", **backend_kw) -> Resident:
    """A push target loaded once from `model_dir`: the backend's model (hf: its module; vllm: its engine, started
    with the push worker extension)."""
    from mergescale.eval.backends import EvalError

    if backend == "hf":
        from mergescale.eval.backends import HFBackend
        from mergescale.eval.resident import ResidentModel

        return ResidentModel(HFBackend(model_dir, **backend_kw))
    if backend == "vllm":
        from mergescale.eval.backends import VLLMBackend
        from mergescale.eval.vllm_resident import EXTENSION, VLLMResident

        engine = VLLMBackend(model_dir, worker_extension_cls=EXTENSION, **backend_kw)
        try:
            return VLLMResident(engine, model_dir)
        except BaseException:
            engine.close()
            raise
    raise EvalError(f"backend {backend}: pushing a merge needs one of {', '.join(PUSH_BACKENDS)}; evaluate the "
                    "written checkpoint instead (mergescale merge, then mergescale eval)")


def evaluate_merge(config, resident: Resident, *, runner=None, progress: bool = True, **eval_kw) -> dict:
    """Merge `config` into `resident` and evaluate it there (mergescale.eval.evaluate's arguments but the model's
    and the engine's). `runner`: who merges (merge.driver.merge_into; default this process, or Ray actors that send
    the rows here). Returns evaluate()'s result with the merge's "manifest"; its scores are cached under the pushed
    model's fingerprint (the per-tensor digests of the merge's bytes)."""
    from mergescale.eval.runner import evaluate
    from mergescale.merge.driver import merge_into
    from mergescale.merge.push import PushOutput

    manifest = merge_into(config, PushOutput(resident), runner=runner, progress=progress)
    pushed = manifest["pushed"]
    resident.require(pushed["fingerprint"])  # checked against the merge's digests, and nothing pushed since
    result = evaluate(pushed["metadata_source"], engine=resident.backend, weights_fingerprint=pushed["fingerprint"],
                      model_label=f"pushed merge {pushed['fingerprint']}", progress=progress, **eval_kw)
    if result["out"]:
        from mergescale.eval.results import write_json_atomic

        write_json_atomic(manifest, Path(result["out"]) / "merge_manifest.json")
    return {**result, "manifest": manifest}
