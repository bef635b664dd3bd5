"""GGUF import: a tiny Llama written as a GGUF here (llama.cpp's tensor names and q/k permutation, the tokenizer as
metadata) comes back as a Hugging Face directory that computes what the original model computes, with the
GGUF's special-token behaviour; unsupported files are refused before anything is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergescale.cli import main
from mergescale.models import ModelImportError, import_gguf, resolve_model, sanity_check
from mergescale.tiny import build_tiny_llama

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (interleaved rotary halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_dir, path, *, add_bos: bool, quant=None, arch: str = "llama", extra_tensor=None):
    """A GGUF of a tiny HF Llama (and its byte-level BPE tokenizer), as llama.cpp's converter writes one."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = model.config
    tok_json = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    special = {"<unk>", "<s>", "</s>", "<pad>"}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(vocab["<pad>"])
    w.add_add_bos_token(add_bos)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, g in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    for hf, g in names.items():
        t = sd[hf]
        if g.endswith("attn_q.weight"):
            t = _permute(t, cfg.num_attention_heads)
        elif g.endswith("attn_k.weight"):
            t = _permute(t, cfg.num_key_value_heads)
        if quant is not None and t.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor[:2], raw_dtype=extra_tensor[2])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", seed=3, num_key_value_heads=2)


def _logits(model_dir, ids):
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0]


def test_import_reproduces_the_model_and_adds_bos_as_the_gguf_says(tiny, tmp_path):
    src = write_gguf(tiny, tmp_path / "tiny.gguf", add_bos=True)
    out = tmp_path / "imported"
    m = import_gguf(src, out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert m["tokenizer"]["add_bos_token"] is True and m["source"]["sha256"]
    # the tokenizer as reloaded from disk adds BOS, then tokenizes exactly as the original
    orig, imp = AutoTokenizer.from_pretrained(str(tiny)), AutoTokenizer.from_pretrained(str(out))
    text = "the movie was great. question: what is the capital of france?"
    assert orig(text)["input_ids"][0] != orig.bos_token_id
    assert imp(text)["input_ids"] == [orig.bos_token_id] + orig(text)["input_ids"]
    # the weights: same logits as the original model (q/k un-permuted, names mapped, nothing lost)
    ids = orig(text)["input_ids"]
    assert torch.allclose(_logits(out, ids), _logits(tiny, ids), atol=1e-5)
    check = sanity_check(out)
    assert math.isfinite(check["perplexity"]) and check["perplexity"] > 1


def test_no_bos_and_quantized_weights(tiny, tmp_path):
    src = write_gguf(tiny, tmp_path / "q8.gguf", add_bos=False, quant=gguf.GGMLQuantizationType.Q8_0)
    out = tmp_path / "q8"
    m = import_gguf(src, out, dtype="bfloat16")
    assert m["gguf_tensor_types"]["Q8_0"] > 0 and m["tokenizer"]["add_bos_token"] is False
    orig, imp = AutoTokenizer.from_pretrained(str(tiny)), AutoTokenizer.from_pretrained(str(out))
    text = "the team won the final match"
    assert imp(text)["input_ids"] == orig(text)["input_ids"]
    got, want = _logits(out, orig(text)["input_ids"]), _logits(tiny, orig(text)["input_ids"])
    # 8-bit blocks and bf16 storage: close, and the same greedy predictions nearly everywhere
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_refusals_write_nothing(tiny, tmp_path):
    bad_arch = write_gguf(tiny, tmp_path / "arch.gguf", add_bos=False, arch="nosucharch")
    with pytest.raises(ModelImportError, match="architecture 'nosucharch' is not supported"):
        import_gguf(bad_arch, tmp_path / "o1")
    q8k = gguf.GGMLQuantizationType.Q8_K  # gguf has no dequantizer for it
    _, block_bytes = gguf.GGML_QUANT_SIZES[q8k]
    bad_q = write_gguf(tiny, tmp_path / "q.gguf", add_bos=False,
                       extra_tensor=("blk.0.extra.weight", np.zeros((2, block_bytes), dtype=np.uint8), q8k))
    with pytest.raises(ModelImportError, match="cannot dequantize quantization type.*Q8_K"):
        import_gguf(bad_q, tmp_path / "o2")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelImportError, match="not a readable GGUF"):
        import_gguf(tmp_path / "junk.gguf", tmp_path / "o3")
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())
    with pytest.raises(ModelImportError, match="not installed.*--no-deps"):
        resolve_model("package:no-such-package-here")


def test_cli_and_cached_resolve(tiny, tmp_path, capsys, monkeypatch):
    src = write_gguf(tiny, tmp_path / "t.gguf", add_bos=True)
    assert main(["models", "import-gguf", str(src), str(tmp_path / "cli"), "--no-check"]) == 0
    assert "add_bos_token=True" in capsys.readouterr().out
    assert main(["models", "import-gguf", str(src), str(tmp_path / "cli")]) == 2  # exists: no --overwrite
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setenv("MERGESCALE_CACHE", str(tmp_path / "cache"))
    first = resolve_model(f"gguf:{src}")
    assert resolve_model(f"gguf:{src}") == first  # imported once
    assert (tmp_path / "cache" / "models").exists() and json.loads((tmp_path / first / "mergescale_manifest.json")
                                                                    .read_text())["source"]["spec"] == f"gguf:{src}"
    assert resolve_model(str(tiny)) == str(tiny)  # a plain directory passes through
    from mergescale.models.sources import resolve_model_dir

    assert resolve_model_dir(f"gguf:{src}") == Path(first)  # what merge, eval and train resolve their models with
