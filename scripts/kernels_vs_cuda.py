"""The fused CPU kernels (numba) against the torch definitions run on CUDA, bit for bit.

    PYTHONPATH=. python3 scripts/kernels_vs_cuda.py          # on a GPU machine

The CPU path of a merge runs mergescale.merge.kernels; GPU merge actors run the methods' torch definitions on CUDA.
Both must give the same bytes, so a merge is the same whichever devices its actors had. Random bf16 tiles with
the awkward cases (zero task vectors, sign cancellations) for every kernel method, bf16 and float32 output.
"""

from __future__ import annotations

import sys

import torch

from mergescale.merge import kernels
from mergescale.merge.methods import get_method
from tests.merge.test_kernels import CASES, context, merge_tile, models


def main() -> int:
    assert torch.cuda.is_available(), "needs a GPU"
    assert kernels.available(), "needs numba"
    n, bad = 3_000_017, 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {n} elements per tile, base + 4 experts")
    for method, params in CASES:
        m = get_method(method)
        p = m.params.model_validate(params)
        base, experts = models(n, torch.bfloat16)
        ctx = context(n, len(experts), offset=2**32 - 1_000_000)  # crosses 2**32 in the DARE index
        for out_dtype in (torch.bfloat16, torch.float32):
            cpu = torch.empty(n, dtype=out_dtype)
            assert merge_tile(method, p, [0.3, 1.0, 0.7, 2.0], ctx, base, experts, cpu)
            gpu = m.merge(base.cuda().float(), [e.cuda().float() for e in experts], [0.3, 1.0, 0.7, 2.0], p,
                          ctx).to(out_dtype).cpu()
            same = torch.equal(cpu.view(torch.uint8), gpu.view(torch.uint8))
            bad += not same
            diff = (cpu.float() - gpu.float()).abs().max().item()
            print(f"{method:16s} {str(params):45s} out {str(out_dtype):15s} identical {same}  max abs diff {diff:g}")
    print("all identical" if not bad else f"{bad} MISMATCHES")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
