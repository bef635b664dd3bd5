"""Tiny, locally built Llama checkpoints and tokenizers for the demo, the tests and the benchmarks.

Nothing here touches a model hub: the tokenizer is trained with `tokenizers` on a small built-in corpus and
the model is randomly initialised from a config. Experts are made by adding a seeded task vector to the base,
so they look like fine-tunes (same names, shapes, dtypes; a small, dense-ish difference).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # tiny models: the bars are noise

_CORPUS = [
    "the movie was great and i loved it",
    "the movie was terrible and i hated it",
    "question: what is the capital of france? answer: paris",
    "sports news: the team won the final match",
    "business news: the company reported record profits",
    "science news: researchers found a new species of frog",
    "premise: the man broke his toe. what was the cause? he dropped a hammer on his foot.",
    "sentence one and sentence two mean the same thing: yes no",
    "positive negative neutral true false maybe",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9 . , ? ! : ;",
]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 384):
    """Train a byte-level BPE tokenizer (GPT-2 style, leading-space tokens) and save it with HF metadata."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:  # byte alphabet (256) + specials is the floor of a byte-level BPE
        raise ValueError(f"a byte-level BPE needs vocab_size >= {tok.get_vocab_size()}, got {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_llama_config(vocab_size: int = 384, hidden: int = 128, layers: int = 2, heads: int = 4, **overrides):
    """A 2-layer Llama config. Head size 32 so vLLM's CPU attention backend accepts it."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "200KB",
    tokenizer: bool = True,
    **config_overrides,
) -> Path:
    """Randomly initialise a tiny Llama and save it as sharded safetensors + index (+ tokenizer)."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(**config_overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer:
        build_tokenizer(out_dir, vocab_size=cfg.vocab_size)
    return out_dir


def make_expert(
    base_dir: str | Path,
    out_dir: str | Path,
    seed: int,
    scale: float = 0.02,
    max_shard_size: str | int = "200KB",
    tensor_scales: dict[str, float] | None = None,
) -> Path:
    """Write base + seeded random task vector as a new checkpoint with the base's layout and tokenizer.

    `tensor_scales` maps a substring of a tensor name to an extra factor on that tensor's task vector, to make
    models whose tensors have very different magnitude scales (global vs per-tensor trim differ there).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    g = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            factor = scale
            for key, extra in (tensor_scales or {}).items():
                if key in name:
                    factor *= extra
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * factor)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if (base_dir / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))
    return out_dir


def build_family(root: str | Path, n_experts: int = 4, seed: int = 0, **kw) -> tuple[Path, list[Path]]:
    """A base plus `n_experts` experts under `root` (base/, expert0/, ...)."""
    root = Path(root)
    base = build_tiny_llama(root / "base", seed=seed, **kw)
    experts = [make_expert(base, root / f"expert{i}", seed=seed * 100 + i) for i in range(n_experts)]
    return base, experts


STUDY_CATEGORIES = ("multiple_choice_qa", "paraphrase_identification", "sentiment", "topic_classification")


def build_study_fixture(root: str | Path, categories=STUDY_CATEGORIES, n_examples: int = 16,
                        trained: dict[str, list[str]] | None = None, multitask: tuple[str, ...] = ()) -> dict:
    """Models and data for a tiny study: a pretrained and an instruction-tuned tiny base (different random inits),
    one expert per category and base (base + a seeded task vector), fixture data for those categories' tasks and
    every held-out task. Returns a study config dict (work_dir root/run). `trained` ({base: [category]}) leaves
    those experts for the study to train (a few steps), and `multitask` names bases whose multitask model it
    trains."""
    from mergescale.eval.fixtures import write_fixture_data

    root = Path(root)
    bases = {"tiny-pt": ("pretrained", 0), "tiny-it": ("instruction_tuned", 1)}
    experts: dict[str, dict] = {}
    for name, (kind, seed) in bases.items():
        base = root / "models" / name
        if not (base / "config.json").exists():
            build_tiny_llama(base, seed=seed, max_shard_size="400KB")
        experts[name] = {}
        for i, cat in enumerate(categories):
            if cat in (trained or {}).get(name, ()):
                experts[name][cat] = "train"
                continue
            out = root / "models" / f"{name}-{cat}"
            if not (out / "config.json").exists():
                make_expert(base, out, seed=100 * seed + i, max_shard_size="400KB")
            experts[name][cat] = str(out)
    data = write_fixture_data(root / "data", ",".join([f"held-in:{c}" for c in categories] + ["held-out"]),
                              n=n_examples)
    return {
        "name": "tiny-study",
        "work_dir": str(root / "run"),
        "bases": [{"name": n, "kind": k, "size": "0.4M", "path": str(root / "models" / n)}
                  for n, (k, _) in bases.items()],
        "experts": experts,
        "multitask": {b: "train" for b in multitask},
        "training": {"max_steps": 2, "batch_size": 2, "lr": 1.0e-3, "optimizer": "adamw", "max_input_len": 64,
                     "max_output_len": 8, "deepspeed": "zero2", "checkpoint_every": 100},
        "methods": [{"label": "Task Arithmetic", "method": "task_arithmetic", "parameters": {"lambda": 0.5}},
                    {"label": "TIES", "method": "ties", "parameters": {"density": 0.2, "trim_scope": "global"}}],
        "num_experts": [2, 4],
        "seeds": [0, 1],
        "held_in": list(categories),
        "held_out": ["held-out"],
        "eval": {"backend": "hf", "data_dir": str(data)},
    }
