"""The merge methods, each declared once: what it accepts (parameters, base, weights, expert count), which
statistics it needs (thresholds of its magnitudes, whole-tensor sums of rows), its definition in torch and, where
one exists, the fused CPU kernel that computes the same bits (mergescale.merge.kernels).

Adding a method: its parameter model and a `register(Method(...))` below, and a test in tests/merge/test_methods.py
against a plain reference. Nothing else names methods: the config schema validates against METHODS, the pipeline
(mergescale.merge.pipeline) dispatches on each method's declaration, the statistics passes are planned from it.

No torch (nor numba) at import: the config schema, a Ray driver that places its actors before it loads anything
heavy, and actors that merge with the kernels alone all read these declarations. The torch definitions import
the math (mergescale.merge.torch_math) when they are called.

Notation: theta_b = base, theta_i = expert i, tau_i = theta_i - theta_b (task vector).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

FLOAT32_MAX = 3.4028234663852886e38


def _within_float32(x: float) -> float:
    if abs(x) > FLOAT32_MAX:
        raise ValueError(f"must be at most {FLOAT32_MAX:.4g} in magnitude: the merge computes in float32, where "
                         f"{x:g} is inf")
    return x


# A factor of the merge's float32 arithmetic (lambda, an expert's weight): finite, and finite in float32 too
Factor = Annotated[float, Field(allow_inf_nan=False), AfterValidator(_within_float32)]


class MethodParams(BaseModel):
    # NaN or inf in a parameter makes every merged value NaN or inf: refused like any other bad value
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ------------------------------------------------------------------------------------------------------------
# What a method needs besides the rows it merges


@dataclass(frozen=True)
class Selection:
    """Order statistics a method needs of each expert's magnitudes, over the whole model (scope "global") or each
    tensor: ranks(n) gives 1-based k-th smallest ranks by bound name ("min": keep |x| >= value, "max": keep
    |x| < value); a None rank means no bound."""

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


def no_selection(params: MethodParams) -> None:
    return None


@dataclass(frozen=True)
class UnitContext:
    """What a method's functions know about the rows they merge: the tensor they belong to, its shape, the flat
    index of their first element in it (DARE's masks are a function of it), the seed, and the statistics the
    merge found for them: per expert {"min": .., "max": ..} thresholds, and the tensor's row sums (float64)."""

    name: str
    shape: tuple[int, ...]
    element_offset: int
    seed: int = 0
    thresholds: list[dict[str, float]] = ()  # per expert; empty dicts where the method has no thresholds
    sums: Any = None  # a torch float64 tensor [S]

    def lower_bounds(self) -> list[float]:
        return [bounds(t)[0] for t in self.thresholds]


def bounds(th: dict[str, float]) -> tuple[float, float]:
    return th.get("min", 0.0), th.get("max", math.inf)


@dataclass(frozen=True)
class Kernel:
    """The fused CPU kernel that computes a method bit for bit (mergescale.merge.kernels): `merge` names its
    family ("average": sum_i w_i theta_i, "linear": theta_b + lambda sum_i w_i tau_i, "ties": theta_b + lambda
    TIES(tau_i)), or None when only the magnitudes have a kernel; `dare` gives the drop probability applied to
    the task vectors first (0: none); `magnitudes`: whether the kernels count the method's magnitudes, |tau| or
    |DARE(tau)| (its `magnitudes` in torch)."""

    merge: Literal["average", "linear", "ties"] | None
    magnitudes: bool = False
    dare: Callable[[MethodParams], float] = lambda params: 0.0


@dataclass(frozen=True)
class Method:
    """One merge method. Its torch functions take float32 tensors (base None for a method without one) and a
    UnitContext:
      merge(base, experts, weights, params, ctx) -> the merged rows
      magnitudes(base, experts, params, ctx) -> per expert, the values whose order statistics `selection` asks for
      row_stats(base, experts, params) -> per-row float64 sums [rows, S]; the merge gets their totals (ctx.sums)
    """

    name: str
    params: type[MethodParams]
    merge: Callable[..., Any]
    needs_base: bool = True
    uses_weights: bool = False  # per-expert weights (experts[].weight); the others refuse weights != 1
    min_experts: int = 1
    max_experts: int | None = None
    selection: Callable[[MethodParams], Selection | None] = no_selection
    magnitudes: Callable[..., Any] | None = None
    row_stats: Callable[..., Any] | None = None
    kernel: Kernel | None = None

    def needs_statistics(self, params: MethodParams) -> bool:
        """Whether a merge with these parameters may need a statistics pass (thresholds or row sums). Without one,
        a Ray driver hands out the merge pass at once and never loads torch or the statistics code."""
        return self.selection(params) is not None or self.row_stats is not None

    def kernels_alone(self, params: MethodParams) -> bool:
        """Whether every unit of such a merge is one fused kernel call on the CPU, with no statistics pass before it
        (so no threshold-finding kernels to load)."""
        return self.kernel is not None and self.kernel.merge is not None and not self.needs_statistics(params)

    def kernels_merge(self) -> bool:
        """Whether the fused CPU kernels do all of this method's math, thresholds included: a process merging it
        on the CPU need not load torch (except for a unit the kernels decline)."""
        k = self.kernel
        return (k is not None and k.merge is not None and self.row_stats is None
                and (self.selection is no_selection or k.magnitudes))


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered already")
    if method.selection is not no_selection and method.magnitudes is None:
        raise ValueError(f"method {method.name!r} selects thresholds of its magnitudes but declares no magnitudes")
    if method.kernel is not None and method.kernel.magnitudes and method.magnitudes is None:
        raise ValueError(f"method {method.name!r}: a magnitudes kernel needs the magnitudes' torch definition")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _math():
    """The torch math, loaded when a method's torch function first runs."""
    from mergescale.merge import torch_math

    return torch_math


# ------------------------------------------------------------------------------------------------------------
# The methods


class AverageParams(MethodParams):
    normalize: bool = True


register(Method(
    name="average", params=AverageParams, needs_base=False, uses_weights=True,
    merge=lambda base, experts, w, p, ctx: _math().average(experts, w, p.normalize),
    kernel=Kernel("average"),
))


class TaskArithmeticParams(MethodParams):
    lambda_: Factor = Field(1.0, alias="lambda")


register(Method(
    name="task_arithmetic", params=TaskArithmeticParams, uses_weights=True,
    merge=lambda base, experts, w, p, ctx: _math().task_arithmetic(base, experts, w, p.lambda_),
    kernel=Kernel("linear"),
))


class TiesParams(MethodParams):
    density: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    trim_scope: Literal["global", "tensor"] = "global"
    sign: Literal["mass", "count"] = "mass"
    lambda_: Factor = Field(1.0, alias="lambda")


def _abs_task_vectors(base, experts, p, ctx):
    return [t.abs() for t in _math().task_vectors(base, experts)]


register(Method(
    name="ties", params=TiesParams,
    merge=lambda base, experts, w, p, ctx: _math().ties(base, experts, ctx.lower_bounds(), p.lambda_, p.sign),
    selection=lambda p: Selection(p.trim_scope, ties_ranks(p.density)),
    magnitudes=_abs_task_vectors,
    kernel=Kernel("ties", magnitudes=True),
))


class DareLinearParams(MethodParams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")
    lambda_: Factor = Field(1.0, alias="lambda")


def _dared(base, experts, p, ctx):
    return _math().dared_task_vectors(base, experts, p.p, ctx.seed, ctx.name, ctx.element_offset)


register(Method(
    name="dare_linear", params=DareLinearParams, uses_weights=True,
    merge=lambda base, experts, w, p, ctx: base + p.lambda_ * _math().weighted_sum(_dared(base, experts, p, ctx), w),
    kernel=Kernel("linear", dare=lambda p: p.p),
))


class DareTiesParams(TiesParams):
    p: float = Field(0.9, ge=0.0, lt=1.0, description="drop probability")
    # DARE already sparsifies; density 1 = no further magnitude trim (mergekit's dare_ties); < 1 also trims
    # the DARE'd vectors by magnitude (MergeLM's dare + ties_merging).
    density: float = Field(1.0, gt=0.0, le=1.0, description="fraction of each DARE'd task vector kept")


def _dare_ties(base, experts, w, p, ctx):
    # TIES on the DARE'd task vectors themselves: trimming (theta_b + DARE(tau_i)) - theta_b instead would round
    # them, and entries at the threshold (computed on |DARE(tau_i)|) could fall below it.
    return base + p.lambda_ * _math().ties_update(_dared(base, experts, p, ctx), ctx.lower_bounds(), p.sign)


register(Method(
    name="dare_ties", params=DareTiesParams, merge=_dare_ties,
    selection=lambda p: Selection(p.trim_scope, ties_ranks(p.density)) if p.density < 1.0 else None,
    magnitudes=lambda base, experts, p, ctx: [t.abs() for t in _dared(base, experts, p, ctx)],
    kernel=Kernel("ties", magnitudes=True, dare=lambda p: p.p),
))


class SlerpParams(MethodParams):
    t: float = Field(0.5, ge=0.0, le=1.0)


def _slerp(base, experts, w, p, ctx):
    s00, s11, s01 = (float(x) for x in ctx.sums)
    n0, n1 = math.sqrt(s00), math.sqrt(s11)
    dot = 1.0 if n0 <= 1e-8 or n1 <= 1e-8 else s01 / (n0 * n1)  # degenerate: plain lerp
    return _math().slerp(experts[0], experts[1], p.t, dot)


def _slerp_row_stats(base, experts, p):
    m = _math()
    a, b = m.as_rows(experts[0]), m.as_rows(experts[1])
    return m.stack_columns([m.row_sums(a * a), m.row_sums(b * b), m.row_sums(a * b)])


register(Method(
    name="slerp", params=SlerpParams, needs_base=False, min_experts=2, max_experts=2,
    merge=_slerp, row_stats=_slerp_row_stats,
))


class BreadcrumbsParams(MethodParams):
    density: float = Field(0.9, gt=0.0, le=1.0)
    gamma: float = Field(0.01, ge=0.0, lt=1.0)
    trim_scope: Literal["global", "tensor"] = "tensor"
    lambda_: Factor = Field(1.0, alias="lambda")


def _breadcrumbs(base, experts, w, p, ctx):
    m = _math()
    taus = [m.trim(t, *bounds(th)) for t, th in zip(m.task_vectors(base, experts), ctx.thresholds)]
    return base + p.lambda_ * m.weighted_sum(taus, w)


register(Method(
    name="breadcrumbs", params=BreadcrumbsParams, uses_weights=True, merge=_breadcrumbs,
    selection=lambda p: Selection(p.trim_scope, breadcrumbs_ranks(p.density, p.gamma)),
    magnitudes=_abs_task_vectors,
    kernel=Kernel(None, magnitudes=True),
))


class ModelStockParams(MethodParams):
    pass


def _model_stock(base, experts, w, p, ctx):
    m, n = _math(), len(experts)
    return m.model_stock(base, experts, m.model_stock_ratio(m.model_stock_cosine(ctx.sums, n), n))


def _model_stock_row_stats(base, experts, p):
    m = _math()
    taus = [m.as_rows(t) for t in m.task_vectors(base, experts)]
    cols = [m.row_sums(t * t) for t in taus]
    cols += [m.row_sums(taus[i] * taus[j]) for i in range(len(taus)) for j in range(i + 1, len(taus))]
    return m.stack_columns(cols)


register(Method(
    name="model_stock", params=ModelStockParams, min_experts=2, merge=_model_stock, row_stats=_model_stock_row_stats,
))

