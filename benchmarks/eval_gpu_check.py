"""GPU check of the hf backend (run on a CUDA machine): log-probs of the cached-prefix path equal a direct
per-example forward pass (fp32 and bf16), greedy generation runs, and rank-classification throughput.

    python benchmarks/eval_gpu_check.py [--out DIR]
Needs torch (CUDA), transformers, tokenizers, pyyaml, jinja2; not `datasets` (no task data is loaded).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--no-pkg-init" in sys.argv:  # GPU images without pydantic: skip mergescale/__init__ (merge config imports)
    import types

    _pkg = types.ModuleType("mergescale")
    _pkg.__path__ = [str(ROOT / "mergescale")]
    sys.modules["mergescale"] = _pkg

import torch  # noqa: E402

from mergescale.eval.backends import HFBackend  # noqa: E402
from mergescale.eval.scoring import gen_request, rank_request  # noqa: E402
from mergescale.eval.tasks import PromptedExample  # noqa: E402
from mergescale.tiny import build_tiny_llama  # noqa: E402

WORDS = "the a river city old man woman went to market bought bread fish because it was raining day".split()


def examples(n, rng, words=(30, 200)):
    out = []
    for i in range(n):
        ctx = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + ". Answer:"
        ch = tuple(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5))) for _ in range(4))
        out.append(PromptedExample(str(i), ctx, ch[0], ch, 0))
    return out


def direct(model, ctx, cont, dev):
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ctx + cont], device=dev)).logits[0].float(), -1)
    return sum(float(lp[len(ctx) - 1 + t, k]) for t, k in enumerate(cont))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-pkg-init", action="store_true", help="import mergescale.eval without mergescale/__init__")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    rng = random.Random(0)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        small = build_tiny_llama(Path(d) / "s", seed=0, vocab_size=384)
        for dtype, tol in (("float32", 1e-4), ("bfloat16", None)):
            be = HFBackend(small, device="cuda", dtype=dtype, max_length=128)
            exs = examples(24, rng)
            reqs = [rank_request(be.tokenizer, e, 128) for e in exs]
            got = be.loglikelihood(reqs)
            diffs = [abs(direct(be.model, c, k, "cuda") - v) for r, g in zip(reqs, got)
                     for c, k, v in zip(r.contexts, r.continuations, g)]
            report[f"max_abs_diff_{dtype}"] = max(diffs)
            if tol is not None:
                assert max(diffs) <= tol, (dtype, max(diffs))
            gens = be.generate([gen_request(be.tokenizer, e, 128, 8) for e in exs[:4]])
            report[f"generate_{dtype}"] = [len(g) for g in gens]
        big = build_tiny_llama(Path(d) / "b", seed=0, vocab_size=384, hidden=1024, layers=12, heads=16,
                               max_position_embeddings=1024, max_shard_size="2GB")
        be = HFBackend(big, device="cuda", dtype="bfloat16", batch_tokens=65536)
        exs = examples(2000, rng, words=(40, 60))
        reqs = [rank_request(be.tokenizer, e, be.max_length) for e in exs]
        be.loglikelihood(reqs[:64])
        torch.cuda.synchronize()
        t = time.perf_counter()
        be.loglikelihood(reqs)
        torch.cuda.synchronize()
        sec = time.perf_counter() - t
        ntok = sum(len(r.contexts[0]) + sum(len(k) for k in r.continuations) for r in reqs)
        report.update(big_params_m=sum(p.numel() for p in be.model.parameters()) / 1e6, examples=len(reqs),
                      seconds=sec, examples_per_s=len(reqs) / sec, scored_tokens_per_s=ntok / sec)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
