"""GGUF -> Hugging Face directory: dequantized weights as sharded safetensors, a config without quantization
settings, and a tokenizer that behaves as the GGUF says (BOS/EOS added or not, its pre-tokenizer), written
atomically by the merge writer. Everything that can be refused (not a GGUF, an architecture or quantization
transformers cannot read, a tokenizer it would rebuild wrongly, an existing output) is refused before a byte is
written.

    from mergescale.models import import_gguf
    manifest = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2-135m-it")
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16")
# llama.cpp pre-tokenizers that split every digit off before the GPT-2 regex (llama-vocab.cpp groups them).
# transformers' GGUF tokenizer does not know them and would silently keep runs of digits together.
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
# pre-tokenizer names whose byte-level split is GPT-2's own
GPT2_PRE = ("default", "gpt-2", "gpt2")


class ModelImportError(ValueError):
    """A GGUF that cannot be imported faithfully; the message names the file and what is unsupported."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_gguf(path: Path) -> tuple[dict, dict[str, int]]:
    """(metadata without the vocabulary arrays, {ggml type name: tensor count}) of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - bad magic, truncated file: numpy/struct errors of all kinds
        raise ModelImportError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            meta[key] = len(field.data)  # only their lengths: the tokenizer is rebuilt by transformers
            continue
        meta[key] = field.contents()
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    _check_dequantizable(path, reader)
    return meta, types


def _check_dequantizable(path: Path, reader) -> None:
    """Every tensor type must be one gguf can dequantize (tried on one row of a tensor of each type)."""
    from gguf import dequantize

    tried: set = set()
    bad = []
    for t in reader.tensors:
        if t.tensor_type in tried:
            continue
        tried.add(t.tensor_type)
        try:
            dequantize(t.data[:1], t.tensor_type)
        except NotImplementedError:
            bad.append(f"{t.tensor_type.name} (e.g. tensor {t.name})")
    if bad:
        raise ModelImportError(f"{path}: cannot dequantize quantization type(s) {', '.join(bad)}; the gguf package "
                               "has no dequantizer for them. Re-export the model with another quantization (Q4_0, "
                               "Q4_1, Q5_*, Q8_0, K-quants, F16, BF16, F32).")


def check_supported(path: Path, meta: dict) -> None:
    """The architecture and tokenizer transformers can rebuild faithfully, else ModelImportError."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = meta.get("general.architecture")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelImportError(f"{path}: architecture {arch!r} is not supported by transformers' GGUF loader; "
                               f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")
    model = meta.get("tokenizer.ggml.model")
    if model is None or not meta.get("tokenizer.ggml.tokens"):
        raise ModelImportError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.model / tokens)")
    if model == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        known = set(GPT2_PRE) | set(DIGIT_SPLIT_PRE) | set(_transformers_pre_splits())
        if pre not in known:
            raise ModelImportError(
                f"{path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer neither transformers nor mergescale "
                f"rebuilds; importing would split text differently from the model's training. "
                f"Known: {', '.join(sorted(known))}")


def _transformers_pre_splits() -> tuple[str, ...]:
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: only GPT-2's split
        return ()
    return tuple(GGUF_PRE_TOKENIZER_SPLITS)


def load_tokenizer(path: Path, meta: dict):
    """transformers' tokenizer for the GGUF, with the file's own special-token behaviour: whether it adds BOS /
    EOS (tokenizer.ggml.add_bos_token / add_eos_token; transformers ignores both and falls back to its class's
    default, e.g. no BOS for byte-level BPE, where Llama 3 needs one) and its pre-tokenizer."""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # transformers' byte-level class adds its default "<|endoftext|>" when the vocabulary lacks it: an id past
    # the model's embedding rows. Only the file's own tokens belong to the model.
    spec = json.loads(tok.backend_tokenizer.to_str())
    n_tokens = meta["tokenizer.ggml.tokens"]
    if any(a["id"] >= n_tokens for a in spec["added_tokens"]):
        spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < n_tokens]
        tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    if meta.get("tokenizer.ggml.pre") in DIGIT_SPLIT_PRE:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and tok.bos_token is None:
        raise ModelImportError(f"{path}: tokenizer.ggml.add_bos_token is true but the file names no BOS token")
    tok.add_bos_token, tok.add_eos_token = add_bos, add_eos
    tok.update_post_processor()
    tok.init_kwargs.update(add_bos_token=add_bos, add_eos_token=add_eos)  # saved, so a reload keeps them
    return tok


def state_dict_without_ties(model) -> dict:
    """The model's tensors, each storage once (a tied lm_head shares the embedding's: save_pretrained drops it
    too, so the import has the names the base of a merge or a training run has)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def import_gguf(gguf_file: str | Path, out: str | Path, *, dtype: str = "float32", shard_size: int | str = "2GB",
                overwrite: bool = False, source: dict | None = None) -> dict:
    """Import a GGUF as a Hugging Face directory at `out`; returns the written manifest. `source`: extra facts
    about where the file came from (a package, its version and licence) for the manifest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergescale.checkpoint.layout import OutputLayout
    from mergescale.checkpoint.output_dir import check_output
    from mergescale.checkpoint.read import safetensors_dtype
    from mergescale.checkpoint.write import PartialOutput
    from mergescale.config import parse_size

    t0 = time.perf_counter()
    path, out = Path(gguf_file).resolve(), Path(out)
    if dtype not in DTYPES:
        raise ModelImportError(f"dtype {dtype!r} not one of {DTYPES}")
    if not path.is_file():
        raise ModelImportError(f"{path}: no such GGUF file")
    check_output(out, overwrite, [path])
    meta, types = read_gguf(path)
    check_supported(path, meta)
    sha = file_sha256(path)

    tok = load_tokenizer(path, meta)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    if len(tok) > config.vocab_size:
        raise ModelImportError(f"{path}: the rebuilt tokenizer has {len(tok)} tokens, the model {config.vocab_size} "
                               "embedding rows")
    tensors = state_dict_without_ties(model)

    layout = OutputLayout.plan([(n, safetensors_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
                               parse_size(shard_size))
    partial = PartialOutput(out, layout, run_key=f"import-gguf:{sha}:{dtype}")
    partial.open(resume=False)
    try:
        for name, t in tensors.items():
            partial.write_rows(name, 0, t)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.meta-") as meta_dir:
            cfg = config.to_dict()
            cfg.pop("quantization_config", None)  # the weights are plain floats now
            cfg["dtype"] = dtype
            (Path(meta_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
            model.generation_config.save_pretrained(meta_dir)
            tok.save_pretrained(meta_dir)
            manifest = {
                "kind": "mergescale-import-gguf",
                "source": {"file": str(path), "sha256": sha, "size": path.stat().st_size, **(source or {})},
                "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
                "license": meta.get("general.license"), "gguf_tensor_types": types, "dtype": dtype,
                "tokenizer": {"model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre"),
                              "add_bos_token": tok.add_bos_token, "add_eos_token": tok.add_eos_token,
                              "chat_template": bool(tok.chat_template)},
                "parameters": sum(t.numel() for t in tensors.values()),
                "timing": {"total_s": round(time.perf_counter() - t0, 3)},
            }
            return partial.commit(Path(meta_dir), manifest, overwrite=overwrite)
    except BaseException:
        partial.abort()
        raise


HELD_OUT_PARAGRAPH = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hills, and the village school opened its doors to families whose houses had flooded. "
    "By the afternoon the rain had stopped, and people began to talk about how to rebuild the old stone bridge."
)


def sanity_check(model_dir: str | Path, prompt: str = "The capital of France is", max_new_tokens: int = 12,
                 paragraph: str = HELD_OUT_PARAGRAPH) -> dict:
    """{"perplexity": on a held-out paragraph, "generation": greedy continuation of `prompt`}; ModelImportError
    when the perplexity is not finite (a broken import, not a weak model)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        ids = torch.tensor([tok(paragraph)["input_ids"]])
        loss = float(model(input_ids=ids, labels=ids).loss)
        p = torch.tensor([tok(prompt)["input_ids"]])
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    ppl = math.exp(loss) if loss < 700 else math.inf
    if not math.isfinite(ppl):
        raise ModelImportError(f"{model_dir}: perplexity on a plain English paragraph is {ppl}; the import is broken")
    return {"perplexity": ppl, "generation": tok.decode(gen[0, p.shape[1]:], skip_special_tokens=True)}
