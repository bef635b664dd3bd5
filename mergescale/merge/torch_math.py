"""The math of the merge methods in torch: pure functions, float32 tensors in and out (float64 where noted), no I/O.

Notation: theta_b = base, theta_i = expert i (i = 1..N), tau_i = theta_i - theta_b (task vector).
Every function here is elementwise given its per-tensor or per-model statistics (thresholds, norms), so a tile of
rows merged alone gives exactly the bytes that the same rows get when the whole tensor is merged. The methods
(mergescale.merge.methods) compose these; the fused CPU kernels (mergescale.merge.kernels) compute the same bits
and are tested against them.

Where reference implementations disagree, an option selects: TIES's sign election by mass (the TIES reference
code) or by count, its disjoint mean over agreeing entries (the reference code; mergekit divides by the sum of
agreeing weights instead), DARE's rescaling by 1 / (1 - p) (the DARE paper, MergeLM, FusionBench, PEFT; mergekit
matches L1 norms per tensor instead).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from mergescale.merge.masks import dare_keep_mask


def task_vectors(base: torch.Tensor, experts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [e - base for e in experts]


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i * t_i, accumulated left to right (a fixed order keeps results bitwise reproducible)."""
    # Separate multiply and add (never add_(alpha=)): ATen fuses alpha into an FMA on its vector path but not on
    # its scalar tail, which would make a tile's last elements round differently from the same elements mid-tile.
    acc = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc += t * w
    return acc


def average(models: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """M = sum_i w_i theta_i / sum_i w_i (normalize) or sum_i w_i theta_i. Paper's Averaging: w_i = 1.

    Accumulated in float64 (one model at a time) and rounded once, so the average of identical models is exactly
    that model for any weights; in float32, (x + x + x) / 3 != x for about 1 value in 7. Normalized by multiplying
    with 1 / sum w (rounded once, on the host): CUDA computes a division by a scalar that way, so CPUs and GPUs
    agree bit for bit."""
    out = models[0].to(torch.float64) * weights[0]
    for m, w in zip(models[1:], weights[1:]):
        out += m.to(torch.float64) * w
    if normalize:
        out.mul_(1.0 / sum(weights))
    return out.to(models[0].dtype)


def task_arithmetic(base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], lam: float) -> torch.Tensor:
    """M = theta_b + lambda * sum_i w_i tau_i  (Ilharco et al. 2023; paper's Task Arithmetic: w_i = 1)."""
    return base + lam * weighted_sum(task_vectors(base, experts), weights)


def trim(tau: torch.Tensor, low: float = 0.0, high: float = math.inf) -> torch.Tensor:
    """Keep entries with low <= |tau| < high, zero the rest."""
    mag = tau.abs()
    keep = mag >= low
    if high != math.inf:
        keep &= mag < high
    return tau * keep


def elect_sign(taus: list[torch.Tensor], mode: Literal["mass", "count"] = "mass") -> torch.Tensor:
    """gamma = sgn(sum_i tau_i) ("mass", TIES paper and reference code) or sgn(sum_i sgn(tau_i)) ("count")."""
    if mode == "mass":
        return torch.sign(weighted_sum(taus, [1.0] * len(taus)))
    return torch.sign(weighted_sum([torch.sign(t) for t in taus], [1.0] * len(taus)))


def disjoint_mean(taus: list[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Mean over only the nonzero entries whose sign agrees with `sign` (divide by their count, min 1).

    As the TIES reference code (`disjoint_merge`). mergekit instead divides by the sum of agreeing weights.
    Where the elected sign is 0 (all trimmed entries zero, or an exact cancellation) the update is 0; the
    reference code would resolve an exact cancellation with the whole model's majority sign.
    """
    total = torch.zeros_like(taus[0])
    count = torch.zeros_like(taus[0])
    for t in taus:
        agree = (torch.sign(t) == sign) & (t != 0)
        total.add_(t * agree)
        count.add_(agree.to(total.dtype))
    return total / count.clamp_(min=1.0)


def ties(
    base: torch.Tensor,
    experts: list[torch.Tensor],
    thresholds: list[float],
    lam: float = 1.0,
    sign_mode: Literal["mass", "count"] = "mass",
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): M = theta_b + lambda * disjoint_mean(trim(tau_i), elect_sign(...)).

    `thresholds[i]` is the magnitude threshold of expert i (entries with |tau_i| >= threshold survive); the
    merge computes it over the whole model (trim_scope=global, the reference code) or per tensor (mergekit).
    """
    return base + lam * ties_update(task_vectors(base, experts), thresholds, sign_mode)


def ties_update(taus: list[torch.Tensor], thresholds: list[float],
                sign_mode: Literal["mass", "count"] = "mass") -> torch.Tensor:
    """The merged task vector of TIES: disjoint_mean(trim(tau_i), elect_sign(...)), trimming the given vectors."""
    fast = _ties_update_fast(taus, thresholds, sign_mode)
    if fast is not None:
        return fast
    trimmed = [trim(t, thr) for t, thr in zip(taus, thresholds)]
    return disjoint_mean(trimmed, elect_sign(trimmed, sign_mode))


def _ties_update_fast(taus: list[torch.Tensor], thresholds: list[float], sign_mode: str) -> torch.Tensor | None:
    """`ties_update` bit for bit, in float-only passes (ATen's bool-producing and mixed float*bool kernels run
    5-40x slower than its float ones). None when a task vector is not finite: NaN/inf propagate differently here,
    so those tiles take the definition above.

    Why the bits agree for finite vectors: (1) |t| - thr >= 0 exactly when |t| >= thr (two floats differ by 0 only
    when equal), so min(sign(|t| - thr) + 1, 1) is the keep mask as 0/1, and t * mask is `trim`'s t * keep.
    (2) t * 1.0 == t, so plain sums elect the same sign. (3) Entries that agree with gamma all have gamma's sign,
    and rounding is symmetric, so sum(t) / c == (sum |t|) / c * gamma; x = max(t * gamma, 0) is |t| exactly
    where t agrees (else 0), and sign(x) counts it. (4) gamma != 0 implies some entry agrees, so the +0 start and
    the zeros of non-agreeing entries give the same +0 where nothing agrees."""
    if any(not bool(torch.isfinite(t.sum())) for t in taus):
        return None
    scratch = torch.empty_like(taus[0])
    trimmed = []
    for t, thr in zip(taus, thresholds):
        if thr > 0.0:  # thr 0 keeps every finite entry: t * 1
            torch.abs(t, out=scratch)
            scratch.sub_(thr).sign_().add_(1.0).clamp_(max=1.0)
            t = t * scratch
        trimmed.append(t)
    if sign_mode == "mass":
        gamma = trimmed[0].clone() if len(trimmed) == 1 else trimmed[0] + trimmed[1]
        for t in trimmed[2:]:
            gamma += t
    else:
        gamma = torch.sign(trimmed[0])
        for t in trimmed[1:]:
            gamma += torch.sign(t, out=scratch)
    gamma.sign_()
    total = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma)
    for t in trimmed:
        torch.mul(t, gamma, out=scratch).clamp_(min=0.0)
        total += scratch
        count += scratch.sign_()
    return total.div_(count.clamp_(min=1.0)).mul_(gamma)


def dare(tau: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop entries where keep is False (each with probability p), rescale by 1/(1-p).

    Rescale as the paper, MergeLM, FusionBench and PEFT (mergekit matches L1 norms per tensor instead). The
    factor 1/(1-p) is rounded once to float32 and multiplied in: CUDA turns a division by a scalar into such a
    multiplication, so a division here would make GPU actors differ from CPUs in the last bit.
    """
    if p == 0.0:
        return tau.clone()
    return tau * keep * (1.0 / (1.0 - p))


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot: float, eps: float = 1e-8,
          lerp_above: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation: M = sin((1-t)W)/sin(W) v0 + sin(tW)/sin(W) v1, W = arccos(dot).

    `dot` is the cosine between the whole tensors v0 and v1 (summed over all tiles by the statistics pass). Falls
    back to linear interpolation when |dot| > lerp_above, as mergekit does.
    """
    if abs(dot) > lerp_above:
        return (1.0 - t) * v0 + t * v1
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1.0 - t) * theta) / s) * v0 + (math.sin(t * theta) / s) * v1


def model_stock_ratio(cos: float, n: int) -> float:
    """Model Stock (Jang et al. 2024): t = N cos / (1 + (N - 1) cos), cos = mean pairwise task-vector cosine."""
    denom = 1.0 + (n - 1) * cos
    if denom == 0.0:  # task vectors exactly "anti-aligned" on average: the ratio is undefined
        raise ValueError(f"model_stock: mean pairwise cosine {cos} = -1/(N-1) makes t = N cos / (1 + (N-1) cos) "
                         "undefined")
    return n * cos / denom


def model_stock(base: torch.Tensor, experts: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """M = t * mean_i theta_i + (1 - t) * theta_b, t from `model_stock_ratio` for this tensor."""
    return ratio * average(experts, [1.0] * len(experts)) + (1.0 - ratio) * base


def dared_task_vectors(base: torch.Tensor, experts: list[torch.Tensor], p: float, seed: int, name: str,
                       element_offset: int) -> list[torch.Tensor]:
    """DARE(tau_i) for every expert, with the masks of the tile's elements (masks.dare_keep_mask)."""
    masks = [dare_keep_mask(seed, i, name, element_offset, tuple(e.shape), p).to(e.device)
             for i, e in enumerate(experts)]
    return [dare(tau, keep, p) for tau, keep in zip(task_vectors(base, experts), masks)]


# Whole-tensor sums of rows (slerp, model_stock), in an order that does not depend on the tiling

def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View a tile as [rows, cols] in float64 (a 1-D tensor's rows are its elements)."""
    t = t.to(torch.float64)
    return t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)


SUM_BLOCK = 1024


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Sum each row of a 2-D tensor in an order that depends only on that row, never on how many rows the tile
    has or how many threads run: fixed 1024-wide blocks (each far below ATen's parallel grain, so reduced
    serially), then a sequential scan over the blocks. Whole-tensor statistics summed from tiles are then
    bitwise the same for any tiling and any number of actors."""
    rows, cols = x.shape
    if cols % SUM_BLOCK:
        x = torch.nn.functional.pad(x, (0, SUM_BLOCK - cols % SUM_BLOCK))
    return x.reshape(rows, -1, SUM_BLOCK).sum(-1).cumsum(-1)[:, -1]


def stack_columns(columns: list[torch.Tensor]) -> torch.Tensor:
    """Per-row statistics [rows] side by side: [rows, S]."""
    return torch.stack(columns, dim=1)


def column_totals(parts: torch.Tensor) -> torch.Tensor:
    """Totals of per-row statistics [rows, S] -> [S], with the same tiling-independent order."""
    return row_sums(parts.t().contiguous())


def model_stock_cosine(stats: torch.Tensor, n: int, eps: float = 1e-8) -> float:
    """Mean pairwise cosine of the task vectors from whole-tensor sums [|tau_1|^2..|tau_N|^2, tau_i.tau_j (i<j)]."""
    norms = [math.sqrt(float(stats[i])) for i in range(n)]
    cos, col = [], n
    for i in range(n):
        for j in range(i + 1, n):
            cos.append(float(stats[col]) / max(norms[i] * norms[j], eps))
            col += 1
    return sum(cos) / len(cos)
