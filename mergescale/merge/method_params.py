"""What each merge method accepts (its parameters, its constraints on the inputs) and which statistics it needs
(thresholds, row sums). No torch here.

The config schema (mergescale.config) validates against this table, so loading a config, and a Ray driver that
places its actors before it imports torch, stay light. The math for each name is registered in
mergescale.merge.methods, which refuses a method that has no entry here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

FLOAT32_MAX = 3.4028234663852886e38


def _within_float32(x: float) -> float:
    if abs(x) > FLOAT32_MAX:
        raise ValueError(f"must be at most {FLOAT32_MAX:.4g} in magnitude: the merge computes in float32, where "
                         f"{x:g} is inf")
    return x


# A factor of the merge's float32 arithmetic (lambda, an expert's weight): finite, and finite in float32 too
Factor = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_within_float32)]


class _Params(BaseModel):
    # NaN or inf in a parameter makes every merged value NaN or inf: refused like any other bad value
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class AverageParams(_Params):
    normalize: bool = True


class TaskArithmeticParams(_Params):
    lambda_: Factor = Field(1.0, alias="lambda")


class TiesParams(_Params):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    trim_scope: Literal["global", "tensor"] = "global"
    sign: Literal["mass", "count"] = "mass"
    lambda_: Factor = Field(1.0, alias="lambda")


class DareLinearParams(_Params):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")
    lambda_: Factor = Field(1.0, alias="lambda")


class DareTiesParams(TiesParams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")
    # DARE already sparsifies; density 1 = no further magnitude trim (mergekit's dare_ties); < 1 also trims
    # the DARE'd vectors by magnitude (MergeLM's dare + ties_merging).
    density: float = Field(1.0, gt=0.0, le=1.0, description="fraction of each DARE'd task vector kept")


class SlerpParams(_Params):
    t: float = Field(0.5, ge=0.0, le=1.0)


class BreadcrumbsParams(_Params):
    density: float = Field(0.9, gt=0.0, le=1.0)
    gamma: float = Field(0.01, ge=0.0, lt=1.0)
    trim_scope: Literal["global", "tensor"] = "tensor"
    lambda_: Factor = Field(1.0, alias="lambda")


class ModelStockParams(_Params):
    pass


# ------------------------------------------------------------------------------------------------------------
# Order statistics a method needs (thresholds of each expert's magnitudes)


@dataclass(frozen=True)
class Selection:
    """Order statistics a method needs of each expert's magnitudes: rank(n) gives 1-based k-th smallest
    ranks by bound name ("min": keep |x| >= value, "max": keep |x| < value); a None rank means no bound."""

    scope: Literal["global", "tensor"]
    ranks: Callable[[int], dict[str, int | None]]


def ties_ranks(density: float) -> Callable[[int], dict[str, int | None]]:
    """The TIES reference code's `topk_values_mask`: threshold = (n - floor(d n))-th smallest |tau|, keep
    |tau| >= threshold. Ties at the threshold are all kept, so at least floor(d n) + 1 entries survive
    (floor(d n) + 1 exactly when magnitudes are distinct). density 1 keeps everything."""

    def ranks(n: int) -> dict[str, int | None]:
        kept = math.floor(density * n)
        return {"min": None if kept >= n else n - kept}

    return ranks


def breadcrumbs_ranks(density: float, gamma: float) -> Callable[[int], dict[str, int | None]]:
    """mergekit's `magnitude_outliers`: drop the n_top = floor(gamma n) largest and the n - floor(d n) - n_top
    smallest magnitudes. As thresholds: keep (n_bot+1)-th smallest <= |tau| < (n - n_top + 1)-th smallest."""

    def ranks(n: int) -> dict[str, int | None]:
        target, n_top = math.floor(density * n), math.floor(gamma * n)
        n_bot = n - target - n_top
        if n_bot < 0:
            n_bot, n_top = 0, n - target
        return {"min": n_bot + 1 if n_bot > 0 else None, "max": n - n_top + 1 if n_top > 0 else None}

    return ranks


def no_selection(params: _Params) -> None:
    return None


def _ties_selection(p) -> Selection:
    return Selection(p.trim_scope, ties_ranks(p.density))


def _dare_ties_selection(p) -> Selection | None:
    return Selection(p.trim_scope, ties_ranks(p.density)) if p.density < 1.0 else None


def _breadcrumbs_selection(p) -> Selection:
    return Selection(p.trim_scope, breadcrumbs_ranks(p.density, p.gamma))


# ------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class MethodSignature:
    params: type[_Params]
    needs_base: bool = True
    uses_weights: bool = False  # per-expert weights (experts[].weight); the others refuse weights != 1
    min_experts: int = 1
    max_experts: int | None = None
    # May need a statistics pass before merging (selection thresholds, or whole-tensor sums); a function of the
    # parameters where they decide. Without one, a Ray driver hands out the merge pass at once and never loads
    # torch or the statistics code (see needs_statistics).
    statistics: bool | Callable[[_Params], bool] = False
    # The thresholds it needs (methods.MergeMethod.selection is this function), and whether it needs whole-tensor
    # sums of rows (methods.MergeMethod.row_stats): here, so that a Ray coordinator plans and runs the statistics
    # passes without torch; register() checks that the method agrees.
    selection: Callable[[_Params], Selection | None] = no_selection
    row_stats: bool = False


SIGNATURES: dict[str, MethodSignature] = {
    "average": MethodSignature(AverageParams, needs_base=False, uses_weights=True),
    "task_arithmetic": MethodSignature(TaskArithmeticParams, uses_weights=True),
    "ties": MethodSignature(TiesParams, statistics=True, selection=_ties_selection),
    "dare_linear": MethodSignature(DareLinearParams, uses_weights=True),
    # density 1 (the default, as mergekit): DARE, then TIES's sign election and disjoint mean; nothing to select
    "dare_ties": MethodSignature(DareTiesParams, statistics=lambda p: p.density < 1.0, selection=_dare_ties_selection),
    "slerp": MethodSignature(SlerpParams, needs_base=False, min_experts=2, max_experts=2, statistics=True,
                             row_stats=True),
    "breadcrumbs": MethodSignature(BreadcrumbsParams, uses_weights=True, statistics=True,
                                   selection=_breadcrumbs_selection),
    "model_stock": MethodSignature(ModelStockParams, min_experts=2, statistics=True, row_stats=True),
}


# Methods with a fused CPU merge kernel (mergescale.merge.kernels); named here so that deciding whether the kernels
# alone can merge a config needs neither torch nor numba.
FUSED_MERGE = ("average", "task_arithmetic", "dare_linear", "ties", "dare_ties")


def needs_statistics(method: str, params: _Params) -> bool:
    """Whether a merge with this method and these parameters may need a statistics pass (the signature's
    `statistics`, evaluated on the parameters)."""
    flag = SIGNATURES[method].statistics
    return bool(flag(params)) if callable(flag) else flag


def kernels_alone(method: str, params: _Params) -> bool:
    """Whether every unit of such a merge is one fused kernel call on the CPU, with no statistics pass before it
    (so no threshold-finding kernels to load)."""
    return method in FUSED_MERGE and not needs_statistics(method, params)


def kernels_merge(method: str) -> bool:
    """Whether the fused CPU kernels do all of this method's math, thresholds included (ties and dare_ties count
    and bracket their magnitudes with kernels too): what merge/kernel_path.py runs, without torch."""
    return method in FUSED_MERGE
