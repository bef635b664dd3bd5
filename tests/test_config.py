"""The config schema: every invalid field fails with a message naming the field and what is allowed."""

from __future__ import annotations

import pytest

from mergescale.config import ConfigError, MergeConfig, load_config, parse_size

BASE = {"base": "/models/base", "experts": ["/models/a", "/models/b", "/models/c"], "method": "ties"}


def bad(fields: dict, *fragments: str, drop: tuple = ()) -> str:
    cfg = {**BASE, **fields}
    for k in drop:
        cfg.pop(k)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in message:\n{msg}"
    return msg


def test_valid_config_and_defaults():
    c = load_config(BASE)
    assert isinstance(c, MergeConfig)
    p = c.method_params
    assert (p.density, p.trim_scope, p.sign, p.lambda_) == (0.2, "global", "mass", 1.0)
    assert c.out_dtype is None and c.out_shard_size == 5 * 10**9 and c.weights == [1.0, 1.0, 1.0]
    assert c.tile_bytes == 64 * 2**20  # base + 3 experts: 320 MB / 4 models, capped at 64 MB
    assert load_config(c) is c


def test_default_tile_is_shared_by_the_models():
    """Unset, tile_mb divides 320 MB among the models (at most 64 MB each), so peak memory, a few tiles per model,
    stays the same whatever the number of experts; set, it is what the user asked for."""
    def tile(n_experts, base=True, **kw):
        cfg = {**BASE, "experts": [f"/e{i}" for i in range(n_experts)], **kw}
        if not base:
            cfg.pop("base")
            cfg["method"] = "average"
        return load_config(cfg).tile_bytes

    assert tile(4) == 64 * 2**20 and tile(1) == 64 * 2**20
    assert tile(8) == int(320 / 9 * 2**20) and tile(8, base=False) == int(320 / 8 * 2**20)
    assert tile(8) * 9 <= 320 * 2**20 and tile(63) * 64 <= 320 * 2**20
    assert tile(8, tile_mb=64) == tile(1, tile_mb=64) == 64 * 2**20
    bad({"tile_mb": 0}, "tile_mb", "greater than 0")


def test_unknown_top_level_field():
    msg = bad({"densty": 0.2}, "densty", "unknown field")
    for allowed in ("base", "experts", "method", "parameters", "out_dtype", "tile_mb"):
        assert allowed in msg


def test_unknown_field_in_expert():
    bad({"experts": [{"path": "/a", "wieght": 2}]}, "experts.0.wieght", "unknown field", "path", "weight")


def test_unknown_method():
    bad({"method": "tie"}, "method", "'tie'", "average", "dare_linear", "dare_ties", "model_stock", "slerp", "ties",
        "task_arithmetic", "breadcrumbs")


@pytest.mark.parametrize(
    "method, params, fragments",
    [
        ("ties", {"density": 0}, ["parameters.density", "greater than 0"]),
        ("ties", {"density": 1.5}, ["parameters.density", "less than or equal to 1"]),
        ("dare_linear", {"p": 1}, ["parameters.p", "less than 1"]),
        ("dare_ties", {"p": -0.1}, ["parameters.p", "greater than or equal to 0"]),
        ("ties", {"trim_scope": "bogus"}, ["parameters.trim_scope", "'global'", "'tensor'", "bogus"]),
        ("ties", {"sign": "bogus"}, ["parameters.sign", "'mass'", "'count'", "bogus"]),
        ("breadcrumbs", {"gamma": 1.0}, ["parameters.gamma", "less than 1"]),
        ("slerp", {"t": 2}, ["parameters.t", "less than or equal to 1"]),
        ("ties", {"lambda": "big"}, ["parameters.lambda", "number"]),
    ],
)
def test_bad_parameter_values(method, params, fragments):
    n = 2 if method == "slerp" else 3
    msg = bad({"method": method, "parameters": params, "experts": BASE["experts"][:n]}, *fragments)
    assert f"method {method!r}" in msg


def test_unknown_parameter_name_lists_allowed():
    bad({"parameters": {"densty": 0.2}}, "parameters.densty", "unknown field", "density", "trim_scope", "sign",
        "lambda")
    bad({"method": "model_stock", "parameters": {"t": 0.5}}, "parameters.t", "unknown field", "allowed: none")


def test_slerp_needs_exactly_two_experts():
    bad({"method": "slerp"}, "'slerp'", "exactly 2 experts", "got 3")
    bad({"method": "model_stock", "experts": ["/a"]}, "'model_stock'", "at least 2 experts", "got 1")


def test_weights_on_method_without_weights():
    bad({"experts": [{"path": "/a", "weight": 2.0}, "/b"]}, "'ties'", "weight", "does not use")
    # methods that use weights accept them
    one = load_config({**BASE, "method": "task_arithmetic", "experts": [{"path": "/a", "weight": 2.0}]})
    assert one.weights == [2.0]


@pytest.mark.parametrize("value, fragment", [("5 parsecs", "expected a size"), (0, "must be positive"),
                                              ("-3MB", "expected a size"), (True, "expected a size")])
def test_bad_out_shard_size(value, fragment):
    bad({"out_shard_size": value}, "out_shard_size", fragment, "5GB")


def test_sizes_parse():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(1000) == 1000
    assert parse_size("1.5 kb") == 1500
    assert load_config({**BASE, "out_shard_size": "2MiB"}).out_shard_size == 2 * 2**20


@pytest.mark.parametrize("value", [0, -1])
def test_tile_mb_must_be_positive(value):
    bad({"tile_mb": value}, "tile_mb", "greater than 0")


def test_bad_out_dtype():
    bad({"out_dtype": "fp8"}, "out_dtype", "'float32'", "'bfloat16'", "'float16'", "fp8")


def test_tokenizer_source_index_out_of_range():
    bad({"tokenizer_source": "expert:3"}, "tokenizer_source", "expert:3", "expert:<0..2>")
    bad({"tokenizer_source": "expert:x"}, "tokenizer_source", "expert:<0..2>")
    assert load_config({**BASE, "tokenizer_source": "expert:2"}).tokenizer_source == "expert:2"


def test_missing_base_for_ties():
    bad({}, "'ties'", "needs a base model", "base", drop=("base",))
    # methods without a base take their layout and tokenizer from the first expert
    assert load_config({**BASE, "method": "average", "base": None}).tokenizer_source == "expert:0"


def test_missing_required_fields():
    bad({}, "experts", "Field required", drop=("experts",))
    bad({}, "method", "Field required", drop=("method",))
    bad({"experts": []}, "experts", "at least 1")


@pytest.mark.parametrize("field, value, fragment", [
    ("seed", -1, "greater than or equal to 0"),
    ("on_nonfinite", "ignore", "'error' or 'warn'"),
    ("allow_pickle", "maybe", "boolean"),
    ("read", "async", "'mmap' or 'pread'"),
    ("write", "o_direct", "'direct' or 'buffered'"),
])
def test_other_fields(field, value, fragment):
    bad({field: value}, field, fragment)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_config(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(e.value)


def test_invalid_yaml(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("method: ties\nexperts: [a, b\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(f)
    assert str(f) in str(e.value)


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_yaml_errors_name_the_file_and_relative_paths_resolve(tmp_path):
    (tmp_path / "m").mkdir()
    f = tmp_path / "c.yaml"
    f.write_text("base: m\nexperts: [m, {path: m, weight: 1.0}, not/here]\nmethod: ties\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(f) in str(e.value) and "bogus" in str(e.value)
    f.write_text("base: m\nexperts: [m, {path: m}, org/model]\nmethod: ties\nout: results/merged\n")
    c = load_config(f)
    assert c.base == str(tmp_path / "m") and [e.path for e in c.experts] == [str(tmp_path / "m")] * 2 + ["org/model"]
    assert c.out == str(tmp_path / "results" / "merged")  # an output that does not exist yet: next to the config


def test_average_weights_summing_to_zero_cannot_normalize():
    experts = [{"path": "/m/e0", "weight": 1.0}, {"path": "/m/e1", "weight": -1.0}]
    bad({"method": "average", "experts": experts}, "experts[].weight", "sum to 0", "normalize: false")
    cfg = load_config({**BASE, "method": "average", "experts": experts, "parameters": {"normalize": False}})
    assert cfg.weights == [1.0, -1.0]


def test_model_stock_undefined_ratio_is_a_clear_error():
    from mergescale.merge.torch_math import model_stock_ratio

    assert model_stock_ratio(0.5, 3) == pytest.approx(3 * 0.5 / 2.0)
    with pytest.raises(ValueError, match="model_stock: mean pairwise cosine"):
        model_stock_ratio(-0.5, 3)
