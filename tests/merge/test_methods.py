"""Every merge method against a plain in-memory reference written from its formula, plus method properties.

The references below never call mergescale.merge.methods: they load whole state dicts with safetensors, build task
vectors, and apply each paper's formula with torch. Only the DARE mask bits come from `dare_keep_mask`, because the
mask is *specified* as a counter-based hash; test_selection.py checks its statistics separately.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergescale.merge.masks import dare_keep_mask
from tests.helpers import load_f32, load_sd, merge, write_like

ATOL = 1e-6
RTOL = 1e-6

# ----------------------------------------------------------------------------------------------------------
# Reference implementations (whole state dicts in memory)


def _taus(base, experts):
    return [{n: e[n] - base[n] for n in base} for e in experts]


def _ties_thresholds(taus: list[dict], density: float, scope: str) -> list[dict]:
    """TIES reference `topk_values_mask`: kthvalue(|tau|, n - floor(d n)), keep |tau| >= it; per expert, over the
    whole flattened model (global) or each tensor (tensor). None: keep everything."""

    def thr(flat: torch.Tensor):
        n = flat.numel()
        kept = math.floor(density * n)
        if kept >= n:
            return None
        return torch.kthvalue(flat, n - kept).values.item()

    out = []
    for tau in taus:
        if scope == "global":
            t = thr(torch.cat([v.abs().reshape(-1) for v in tau.values()]))
            out.append({n: t for n in tau})
        else:
            out.append({n: thr(v.abs().reshape(-1)) for n, v in tau.items()})
    return out


def _ties_from_taus(base, taus, density, scope, sign, lam):
    thresholds = _ties_thresholds(taus, density, scope)
    out = {}
    for name in base:
        trimmed = []
        for tau, th in zip(taus, thresholds):
            t = tau[name]
            trimmed.append(t if th[name] is None else t * (t.abs() >= th[name]))
        if sign == "mass":
            gamma = torch.sign(sum(trimmed))
        else:
            gamma = torch.sign(sum(torch.sign(t) for t in trimmed))
        agree = [(torch.sign(t) == gamma) & (t != 0) for t in trimmed]
        total = sum(t * a for t, a in zip(trimmed, agree))
        count = sum(a.to(torch.float32) for a in agree)
        out[name] = base[name] + lam * (total / count.clamp(min=1.0))
    return out


def ref_average(base, experts, weights, normalize=True):
    out = {}
    for name in experts[0]:
        s = sum(w * e[name] for w, e in zip(weights, experts))
        out[name] = s * (1.0 / sum(weights)) if normalize else s
    return out


def ref_task_arithmetic(base, experts, weights, lam=1.0):
    taus = _taus(base, experts)
    return {n: base[n] + lam * sum(w * t[n] for w, t in zip(weights, taus)) for n in base}


def ref_ties(base, experts, density=0.2, trim_scope="global", sign="mass", lam=1.0):
    return _ties_from_taus(base, _taus(base, experts), density, trim_scope, sign, lam)


def _dare_taus(base, experts, p, seed):
    out = []
    for i, tau in enumerate(_taus(base, experts)):
        d = {}
        for name, t in tau.items():
            keep = dare_keep_mask(seed, i, name, 0, tuple(t.shape), p)
            d[name] = t * keep * (1.0 / (1.0 - p))
        out.append(d)
    return out


def ref_dare_linear(base, experts, weights, p, seed, lam=1.0):
    dared = _dare_taus(base, experts, p, seed)
    return {n: base[n] + lam * sum(w * d[n] for w, d in zip(weights, dared)) for n in base}


def ref_dare_ties(base, experts, p, seed, density=1.0, trim_scope="global", sign="mass", lam=1.0):
    return _ties_from_taus(base, _dare_taus(base, experts, p, seed), density, trim_scope, sign, lam)


def slerp_cos(v0: torch.Tensor, v1: torch.Tensor) -> float:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    n0, n1 = a.norm().item(), b.norm().item()
    if n0 <= 1e-8 or n1 <= 1e-8:
        return 1.0
    return (a @ b).item() / (n0 * n1)


def ref_slerp(experts, t):
    v0s, v1s = experts
    out = {}
    for name in v0s:
        v0, v1 = v0s[name], v1s[name]
        dot = slerp_cos(v0, v1)
        if abs(dot) > 0.9995:
            out[name] = (1 - t) * v0 + t * v1
        else:
            omega = math.acos(max(-1.0, min(1.0, dot)))
            so = math.sin(omega)
            out[name] = (math.sin((1 - t) * omega) / so) * v0 + (math.sin(t * omega) / so) * v1
    return out


def _magnitude_outliers_mask(w: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit `magnitude_outliers` on a flat magnitude vector: sort ascending, keep positions
    [n_bot, n - n_top) (mergekit writes indices[n_bot:-n_top]; n - n_top avoids its empty slice at n_top = 0)."""
    n = w.numel()
    if density >= 1:
        return torch.ones(n, dtype=torch.bool)
    target, n_top = int(density * n), int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_bot, n_top = 0, n - target
    order = torch.sort(w, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bot : n - n_top]] = True
    return mask


def ref_breadcrumbs(base, experts, weights, density=0.9, gamma=0.01, trim_scope="tensor", lam=1.0):
    taus = _taus(base, experts)
    names = list(base)
    kept = []
    for tau in taus:
        if trim_scope == "global":
            flat = torch.cat([tau[n].reshape(-1) for n in names])
            mask = _magnitude_outliers_mask(flat.abs(), density, gamma)
            k, pos = {}, 0
            for n in names:
                m = tau[n].numel()
                k[n] = tau[n] * mask[pos : pos + m].reshape(tau[n].shape)
                pos += m
        else:
            k = {n: tau[n] * _magnitude_outliers_mask(tau[n].abs().reshape(-1), density, gamma).reshape(tau[n].shape)
                 for n in names}
        kept.append(k)
    return {n: base[n] + lam * sum(w * k[n] for w, k in zip(weights, kept)) for n in names}


def ref_model_stock(base, experts):
    taus = _taus(base, experts)
    N = len(experts)
    out = {}
    for name in base:
        vs = [t[name].double().reshape(-1) for t in taus]
        cos = []
        for i in range(N):
            for j in range(i + 1, N):
                cos.append((vs[i] @ vs[j]).item() / max(vs[i].norm().item() * vs[j].norm().item(), 1e-8))
        c = sum(cos) / len(cos)
        ratio = N * c / (1 + (N - 1) * c)
        mean = sum(e[name] for e in experts) / N
        out[name] = ratio * mean + (1 - ratio) * base[name]
    return out


# variant id -> (method, parameters, weights or None, number of experts, uses base, reference)
VARIANTS = {
    "average": ("average", {}, None, 3, False, lambda b, e, w, s: ref_average(b, e, [1.0] * 3)),
    "average_weighted": ("average", {}, [1.0, 2.0, 0.5], 3, False, lambda b, e, w, s: ref_average(b, e, w)),
    "average_unnormalized": ("average", {"normalize": False}, [0.2, 0.3, 0.5], 3, True,
                             lambda b, e, w, s: ref_average(b, e, w, normalize=False)),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}, [1.0, 0.5, 2.0], 3, True,
                        lambda b, e, w, s: ref_task_arithmetic(b, e, w, 0.7)),
    "ties_global_mass": ("ties", {"density": 0.3, "trim_scope": "global", "sign": "mass", "lambda": 1.2}, None, 3, True,
                         lambda b, e, w, s: ref_ties(b, e, 0.3, "global", "mass", 1.2)),
    "ties_global_count": ("ties", {"density": 0.2, "sign": "count"}, None, 3, True,
                          lambda b, e, w, s: ref_ties(b, e, 0.2, "global", "count")),
    "ties_tensor_mass": ("ties", {"density": 0.3, "trim_scope": "tensor"}, None, 3, True,
                         lambda b, e, w, s: ref_ties(b, e, 0.3, "tensor", "mass")),
    "ties_tensor_count": ("ties", {"density": 0.5, "trim_scope": "tensor", "sign": "count", "lambda": 0.8}, None, 3,
                          True, lambda b, e, w, s: ref_ties(b, e, 0.5, "tensor", "count", 0.8)),
    "dare_linear": ("dare_linear", {"p": 0.4, "lambda": 0.9}, [1.0, 0.5, 2.0], 3, True,
                    lambda b, e, w, s: ref_dare_linear(b, e, w, 0.4, s, 0.9)),
    "dare_ties": ("dare_ties", {"p": 0.5}, None, 3, True, lambda b, e, w, s: ref_dare_ties(b, e, 0.5, s)),
    "dare_ties_trim_global": ("dare_ties", {"p": 0.3, "density": 0.5, "lambda": 1.1}, None, 3, True,
                              lambda b, e, w, s: ref_dare_ties(b, e, 0.3, s, 0.5, "global", "mass", 1.1)),
    "dare_ties_trim_tensor": ("dare_ties", {"p": 0.3, "density": 0.4, "trim_scope": "tensor", "sign": "count"}, None,
                              3, True, lambda b, e, w, s: ref_dare_ties(b, e, 0.3, s, 0.4, "tensor", "count")),
    "slerp": ("slerp", {"t": 0.3}, None, 2, False, lambda b, e, w, s: ref_slerp(e, 0.3)),
    "breadcrumbs_tensor": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, [1.0, 0.5, 2.0], 3, True,
                           lambda b, e, w, s: ref_breadcrumbs(b, e, w, 0.8, 0.05, "tensor")),
    "breadcrumbs_global": ("breadcrumbs", {"density": 0.7, "gamma": 0.02, "trim_scope": "global", "lambda": 0.8},
                           None, 3, True,
                           lambda b, e, w, s: ref_breadcrumbs(b, e, [1.0] * 3, 0.7, 0.02, "global", 0.8)),
    "model_stock": ("model_stock", {}, None, 3, True, lambda b, e, w, s: ref_model_stock(b, e)),
}
SEED = 7


def variant_config(fam, variant: str, **extra) -> dict:
    method, params, weights, n, uses_base, _ = VARIANTS[variant]
    experts = fam.expert_strs[:n]
    cfg = {
        "method": method,
        "parameters": params,
        "experts": [{"path": p, "weight": w} for p, w in zip(experts, weights)] if weights else experts,
        "seed": SEED,
    }
    if uses_base:
        cfg["base"] = str(fam.base)
    cfg.update(extra)
    return cfg


def reference(fam, variant: str) -> dict[str, torch.Tensor]:
    _, _, weights, n, _, ref = VARIANTS[variant]
    base = load_f32(fam.base)
    experts = [load_f32(e) for e in fam.experts[:n]]
    return ref(base, experts, weights or [1.0] * n, SEED)


def assert_matches(out_dir, ref: dict[str, torch.Tensor]) -> None:
    got = load_sd(out_dir)
    assert set(got) == set(ref)
    for name, r in ref.items():
        torch.testing.assert_close(got[name].to(torch.float32), r, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------------------
# Reference comparisons


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(family, tmp_path, variant):
    out = tmp_path / "out"
    merge(variant_config(family, variant), out)
    assert_matches(out, reference(family, variant))


# Tile sizes (bytes of float32 per model): whole tensors; 5 rows of a 32-wide tensor (odd remainders: 64 = 12*5+4);
# 100 bytes = one row per unit, 1-D tensors in 25-element tiles (32 = 25 + 7).
TILES = [64.0, 700 / 2**20, 100 / 2**20]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tile_size_invariance(micro, tmp_path, monkeypatch, variant):
    """Same bytes for every output tensor whatever the tiling, and each tiling matches the reference."""
    from mergescale.config import load_config
    from mergescale.merge import pipeline
    from mergescale.merge.inputs import open_inputs, plan_merge

    ref = reference(micro, variant)
    outputs = []
    # Last: whole-tensor units that the torch path computes in 100-element row chunks.
    for i, (tile_mb, chunk) in enumerate([(t, None) for t in TILES] + [(64.0, 100)]):
        if chunk is not None:
            monkeypatch.setattr(pipeline, "CHUNK_ELEMS", chunk)
        cfg = variant_config(micro, variant, tile_mb=tile_mb)
        if i == len(TILES) - 1:  # the tiling really splits every tensor, 1-D ones included, with a remainder
            inputs = open_inputs(load_config(cfg))
            plan = plan_merge(load_config(cfg), inputs)
            inputs.close()
            for t in plan.tensors:
                units = plan.units_of[t.name]
                assert len(units) > 1, t.name
            assert any((t.rows % (plan.units_of[t.name][0].row_end)) for t in plan.tensors)
        out = tmp_path / f"out{i}"
        manifest = merge(cfg, out)
        assert_matches(out, ref)
        outputs.append((manifest["outputs"], load_sd(out)))
    first_digests, first = outputs[0]
    for digests, sd in outputs[1:]:
        assert digests == first_digests
        for name, t in first.items():
            assert torch.equal(sd[name].view(torch.uint8), t.view(torch.uint8)), name


def test_slerp_covers_both_branches(family):
    """The family has tensors on both sides of the lerp fallback (norm weights are ~1 in both experts)."""
    e0, e1 = load_f32(family.experts[0]), load_f32(family.experts[1])
    cos = [abs(slerp_cos(e0[n], e1[n])) for n in e0]
    assert any(c > 0.9995 for c in cos) and any(c <= 0.9995 for c in cos)


def test_slerp_endpoints(family, tmp_path):
    for t, which in ((0.0, 0), (1.0, 1)):
        out = tmp_path / f"t{t}"
        merge({"method": "slerp", "experts": family.expert_strs[:2], "parameters": {"t": t}}, out)
        want = load_f32(family.experts[which])
        got = load_f32(out)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------------
# Properties


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 1.7, 2.9]])
def test_average_of_identical_experts_is_exact(family, tmp_path, weights):
    e = str(family.experts[0])
    out = tmp_path / "out"
    merge({"method": "average", "experts": [{"path": e, "weight": w} for w in weights]}, out)
    got, want = load_sd(out), load_sd(e)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_task_arithmetic_lambda_zero_is_base(family, tmp_path):
    out = tmp_path / "out"
    merge({"method": "task_arithmetic", "base": str(family.base), "experts": family.expert_strs,
           "parameters": {"lambda": 0.0}}, out)
    got, want = load_sd(out), load_sd(family.base)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_ties_density_one_agreeing_signs_is_mean(family, tmp_path):
    """With nothing trimmed and every task vector sharing one sign pattern, TIES = base + lambda * mean(tau_i)."""
    base = load_f32(family.base)
    g = torch.Generator().manual_seed(123)
    signs = {n: torch.where(torch.rand(t.shape, generator=g) < 0.5, -1.0, 1.0) for n, t in base.items()}
    taus, paths = [], []
    for i in range(3):
        tau = {n: signs[n] * (torch.rand(t.shape, generator=g) * 0.05 + 1e-3) for n, t in base.items()}
        taus.append(tau)
        paths.append(str(write_like(family.base, tmp_path / f"agree{i}", {n: base[n] + tau[n] for n in base})))
    out = tmp_path / "out"
    lam = 0.8
    merge({"method": "ties", "base": str(family.base), "experts": paths,
           "parameters": {"density": 1.0, "lambda": lam}}, out)
    got = load_f32(out)
    real_taus = [{n: load_f32(p)[n] - base[n] for n in base} for p in paths]
    for n in base:
        want = base[n] + lam * (sum(t[n] for t in real_taus) / 3)
        torch.testing.assert_close(got[n], want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "dare_params, plain",
    [
        ({"method": "dare_linear", "parameters": {"p": 0.0, "lambda": 0.6}, "weights": [1.0, 0.4, 2.0]},
         {"method": "task_arithmetic", "parameters": {"lambda": 0.6}, "weights": [1.0, 0.4, 2.0]}),
        ({"method": "dare_ties", "parameters": {"p": 0.0, "density": 0.3, "sign": "count"}},
         {"method": "ties", "parameters": {"density": 0.3, "sign": "count"}}),
        ({"method": "dare_ties", "parameters": {"p": 0.0, "density": 0.4, "trim_scope": "tensor", "lambda": 1.3}},
         {"method": "ties", "parameters": {"density": 0.4, "trim_scope": "tensor", "lambda": 1.3}}),
        ({"method": "dare_ties", "parameters": {"p": 0.0}},
         {"method": "ties", "parameters": {"density": 1.0}}),
    ],
    ids=["dare_linear", "dare_ties_global", "dare_ties_tensor", "dare_ties_density1"],
)
def test_dare_with_p_zero_equals_underlying_method(family, tmp_path, dare_params, plain):
    def cfg(spec):
        w = spec.get("weights")
        experts = [{"path": p, "weight": x} for p, x in zip(family.expert_strs, w)] if w else family.expert_strs
        return {"method": spec["method"], "parameters": spec["parameters"], "base": str(family.base),
                "experts": experts, "seed": 11}

    a = merge(cfg(dare_params), tmp_path / "dare")
    b = merge(cfg(plain), tmp_path / "plain")
    assert a["outputs"] == b["outputs"]
    sa, sb = load_sd(tmp_path / "dare"), load_sd(tmp_path / "plain")
    for n in sa:
        assert torch.equal(sa[n].view(torch.uint8), sb[n].view(torch.uint8)), n


def test_dare_drops_p_and_rescales_kept_entries(family, tmp_path):
    """One expert, dare_linear: dropped entries stay exactly the base; kept ones move by tau / (1 - p)."""
    p = 0.5
    out = tmp_path / "out"
    merge({"method": "dare_linear", "base": str(family.base), "experts": family.expert_strs[:1],
           "parameters": {"p": p}, "seed": 3}, out)
    base, expert, got = load_f32(family.base), load_f32(family.experts[0]), load_f32(out)
    unchanged = total = 0
    for n in base:
        tau, delta = expert[n] - base[n], got[n] - base[n]
        same = got[n] == base[n]
        unchanged += int(same.sum())
        total += tau.numel()
        kept = ~same
        torch.testing.assert_close(delta[kept], tau[kept] / (1 - p), atol=ATOL, rtol=1e-5)
    assert abs(unchanged / total - p) < 0.01


def test_global_and_tensor_trim_differ_on_scaled_model(scaled, tmp_path):
    cfg = {"method": "ties", "base": str(scaled.base), "experts": scaled.expert_strs, "parameters": {"density": 0.2}}
    merge({**cfg, "parameters": {"density": 0.2, "trim_scope": "global"}}, tmp_path / "global")
    merge({**cfg, "parameters": {"density": 0.2, "trim_scope": "tensor"}}, tmp_path / "tensor")
    base, g, t = load_f32(scaled.base), load_f32(tmp_path / "global"), load_f32(tmp_path / "tensor")

    def changed(sd, key):
        names = [n for n in base if key in n]
        return sum(int((sd[n] != base[n]).sum()) for n in names) / sum(base[n].numel() for n in names)

    assert any(not torch.equal(g[n], t[n]) for n in base)
    # Global trim spends the budget on the large-scale MLP tensors and almost none on the small-scale embedding;
    # per-tensor trim keeps about the same fraction everywhere.
    assert changed(g, "embed_tokens") < 0.01 < 0.2 < changed(t, "embed_tokens")
    assert changed(g, "mlp") > 0.6 > 0.5 > changed(t, "mlp")


def test_global_thresholds_in_manifest_equal_kthvalue(family, tmp_path):
    density = 0.25
    manifest = merge({"method": "ties", "base": str(family.base), "experts": family.expert_strs,
                      "parameters": {"density": density}, "tile_mb": 3000 / 2**20}, tmp_path / "out")
    base = load_f32(family.base)
    recorded = manifest["global_thresholds"]["*"]
    assert len(recorded) == 3
    for i, e in enumerate(family.experts):
        ex = load_f32(e)
        flat = torch.cat([(ex[n] - base[n]).abs().reshape(-1) for n in base])
        k = flat.numel() - math.floor(density * flat.numel())
        assert recorded[i]["min"] == torch.kthvalue(flat, k).values.item()


def test_declaring_the_methods_loads_neither_torch_nor_numba():
    """The config schema, a Ray driver and kernel-only actors read the declarations (mergescale.merge.methods): the
    math loads only when a method's torch function runs."""
    import subprocess
    import sys

    code = ("import sys, mergescale.config, mergescale.merge.methods as m; "
            "assert len(m.METHODS) == 8 and not {'torch', 'numba'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_refuses_a_method_declared_inconsistently():
    """A method that selects thresholds of its magnitudes must declare them in torch (the definition its kernel is
    checked against), and a name is declared once."""
    import dataclasses

    from mergescale.merge.methods import METHODS, Kernel, Selection, register, ties_ranks

    before = dict(METHODS)
    ties = METHODS["ties"]
    with pytest.raises(ValueError, match="registered already"):
        register(ties)
    with pytest.raises(ValueError, match="declares no magnitudes"):
        register(dataclasses.replace(ties, name="ties2", magnitudes=None))
    with pytest.raises(ValueError, match="magnitudes kernel needs"):
        register(dataclasses.replace(METHODS["average"], name="avg2", kernel=Kernel("average", magnitudes=True)))
    with pytest.raises(ValueError, match="declares no magnitudes"):
        register(dataclasses.replace(METHODS["average"], name="avg3",
                                     selection=lambda p: Selection("tensor", ties_ranks(0.5))))
    assert METHODS == before


@pytest.mark.parametrize("method,params", [
    ("average", {}), ("task_arithmetic", {}), ("dare_linear", {"p": 0.5}),
    ("ties", {}), ("ties", {"density": 1.0}), ("dare_ties", {}), ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": 1.0, "trim_scope": "tensor"}), ("slerp", {"t": 0.5}), ("breadcrumbs", {}),
    ("model_stock", {}),
])
def test_needs_statistics_agrees_with_what_the_method_selects(method, params):
    """Method.needs_statistics (torch-free, what the Ray driver and actors decide on) is False only where the
    method neither selects nor sums rows for these parameters; dare_ties without an extra trim (density 1, the
    default) is such a case, and its units are then each one fused kernel call."""
    from mergescale.merge.methods import METHODS

    m = METHODS[method]
    p = m.params.model_validate(params)
    assert m.needs_statistics(p) == (method in ("ties", "slerp", "breadcrumbs", "model_stock")
                                     or (method == "dare_ties" and p.density < 1.0))
    assert m.kernels_alone(p) == (method in ("average", "task_arithmetic", "dare_linear")
                                  or (method == "dare_ties" and p.density >= 1.0))
    assert m.kernels_merge() == (method in ("average", "task_arithmetic", "dare_linear", "ties", "dare_ties"))
