"""Scoring backends: `hf` (transformers; embedded default) and `vllm`. Both take token IDs built by
mergescale.eval.scoring (never re-tokenize text) and return summed log-probs per choice / generated token IDs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import psutil
import torch

from mergescale import reaper
from mergescale.eval.scoring import GenRequest, RankRequest

log = logging.getLogger(__name__)
BACKENDS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16", "auto")


class EvalError(ValueError):
    """Bad evaluation input (model, tokenizer, backend); raised before anything is written."""


def load_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """The model's tokenizer, checked against its embedding rows (a tokenizer with more ids than the model
    has rows cannot belong to it)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{model_dir}: cannot read config.json: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - missing files, bad JSON
        raise EvalError(f"{tokenizer_dir or model_dir}: cannot load a tokenizer: {e}") from None
    rows = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    if rows is not None and len(tok) > rows:
        raise EvalError(f"{model_dir}: tokenizer has {len(tok)} tokens but the model's embedding has {rows} rows; "
                        "the tokenizer does not belong to this model (pass the right tokenizer directory)")
    return tok, cfg


def model_positions(cfg: dict) -> int | None:
    for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if cfg.get(k):
            return int(cfg[k])
    return None


# Default scoring window on CPUs: a model's full context (8,192 for SmolLM2) makes vLLM size its KV cache and
# sequence buffers for it; evaluation prompts here are far shorter.
CPU_MAX_LENGTH = 2048


def model_max_length(cfg: dict, override: int | None = None, cap: int | None = None) -> int:
    """The scoring window in tokens: `override`, else the model's positions minus one (vLLM must place one
    output token after every prompt, so its prompts can be at most positions - 1 long; all backends share
    the window so they truncate identically), at most `cap` when no window is asked for. EvalError for a
    window under 2 tokens or past the positions (transformers would score tokens at positions the model never
    saw, without a word)."""
    positions = model_positions(cfg)
    if override is None:
        n = (positions or 2049) - 1
        return min(n, cap) if cap else n
    if override < 2:
        raise EvalError(f"max_length must be at least 2 tokens (a context token and a choice token), got {override}")
    if positions is not None and override >= positions:
        raise EvalError(f"max_length {override} must be below the model's {positions} positions "
                        f"(max_position_embeddings in config.json); at most {positions - 1}")
    return override


def check_device(device: str) -> None:
    """EvalError for a device string torch does not know, or a GPU this machine does not have."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise EvalError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class HFBackend:
    """transformers forward passes. Rank requests: contexts run once (left-padded batch, KV cache kept),
    then all choices of those contexts run as one batch on copies of the cached prefix."""

    name = "hf"

    def __init__(self, model_dir, device: str | None = None, dtype: str = "float32", max_length: int | None = None,
                 batch_tokens: int = 16384, tokenizer_dir=None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.tokenizer, cfg = load_tokenizer(model_dir, tokenizer_dir)
        self.max_length = model_max_length(cfg, max_length)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=_dtype(dtype, self.device), trust_remote_code=False).to(self.device).eval()
        # Plain greedy decoding, as vLLM does with our SamplingParams: transformers would otherwise fill in the
        # model's generation_config.json (repetition_penalty, no_repeat_ngram_size, ...) without a word.
        self.model.generation_config = GenerationConfig()
        self.batch_tokens = batch_tokens
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _batches(self, groups: list, length):
        """Greedy batches of groups (sorted longest first) under the token budget."""
        batch, width, rows = [], 0, 0
        for g in groups:
            w, r = length(g)
            if batch and (max(width, w) * (rows + r) > self.batch_tokens):
                yield batch
                batch, width, rows = [], 0, 0
            batch.append(g)
            width, rows = max(width, w), rows + r
        if batch:
            yield batch

    @torch.inference_mode()
    def loglikelihood(self, requests: list[RankRequest]) -> list[list[float]]:
        out = [[0.0] * len(r.continuations) for r in requests]
        groups: list[tuple[tuple[int, ...], list[tuple[int, int, list[int]]]]] = []
        for i, r in enumerate(requests):
            by_ctx: dict[tuple[int, ...], list] = {}
            for j, (c, k) in enumerate(zip(r.contexts, r.continuations)):
                by_ctx.setdefault(tuple(c), []).append((i, j, k))
            groups += list(by_ctx.items())
        groups.sort(key=lambda g: -(len(g[0]) + max(len(k) for _, _, k in g[1])))
        for batch in self._batches(groups, lambda g: (len(g[0]) + max(len(k) for *_, k in g[1]), len(g[1]))):
            self._score_batch(batch, out)
        return out

    def _score_batch(self, batch, out):
        dev = self.device
        ctxs = [list(c) for c, _ in batch]
        lc = max(len(c) for c in ctxs)
        ids = torch.full((len(ctxs), lc), self.pad, dtype=torch.long)
        mask = torch.zeros((len(ctxs), lc), dtype=torch.long)
        for b, c in enumerate(ctxs):  # left padding: every context ends at column lc-1
            ids[b, lc - len(c):] = torch.tensor(c)
            mask[b, lc - len(c):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
        rows = [(b, i, j, k) for b, (_, members) in enumerate(batch) for i, j, k in members]
        for b, i, j, k in rows:
            out[i][j] = float(first[b, k[0]])
        lk = max(len(k) for *_, k in rows) - 1
        if lk == 0:
            return
        idx = torch.tensor([b for b, *_ in rows], device=dev)
        cache = res.past_key_values
        cache.reorder_cache(idx)  # one copy of each context's KV per choice
        cids = torch.full((len(rows), lk), self.pad, dtype=torch.long)
        cmask = torch.zeros((len(rows), lk), dtype=torch.long)
        for r, (*_, k) in enumerate(rows):  # the choice's tokens but its last predict its remaining tokens
            if len(k) > 1:
                cids[r, :len(k) - 1] = torch.tensor(k[:-1])
                cmask[r, :len(k) - 1] = 1
        cids, cmask = cids.to(dev), cmask.to(dev)
        am = torch.cat([mask[idx], cmask], dim=1)
        cpos = mask[idx].sum(-1, keepdim=True) + torch.arange(lk, device=dev)
        logits = self.model(input_ids=cids, attention_mask=am, position_ids=cpos, past_key_values=cache).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        for r, (b, i, j, k) in enumerate(rows):
            if len(k) > 1:
                tgt = torch.tensor(k[1:], device=dev)
                out[i][j] += float(logp[r, torch.arange(len(k) - 1, device=dev), tgt].sum())

    @torch.inference_mode()
    def generate(self, requests: list[GenRequest]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in requests]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].context))
        eos = self.tokenizer.eos_token_id
        groups = [(i, len(requests[i].context) + requests[i].max_new_tokens) for i in order]
        for batch in self._batches(groups, lambda g: (g[1], 1)):
            reqs = [requests[i] for i, _ in batch]
            lc = max(len(r.context) for r in reqs)
            ids = torch.full((len(reqs), lc), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, r in enumerate(reqs):
                ids[b, lc - len(r.context):] = torch.tensor(r.context)
                mask[b, lc - len(r.context):] = 1
            watch = _NonFiniteWatch(len(reqs))
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max(r.max_new_tokens for r in reqs), do_sample=False,
                                      pad_token_id=self.pad, eos_token_id=eos, logits_processor=[watch])
            for b, (i, _) in enumerate(batch):
                toks = gen[b, lc:lc + requests[i].max_new_tokens].tolist()
                out[i] = None if watch.bad[b] else toks[:toks.index(eos)] if eos in toks else toks
        return out


class _NonFiniteWatch:
    """A logits processor that only looks: which batch rows saw a NaN, a +inf, or no finite logit at all
    (other processors may set -inf on purpose). Greedy argmax over NaNs would still emit tokens."""

    def __init__(self, rows: int):
        self.bad = [False] * rows

    def __call__(self, input_ids, scores):
        top = scores.amax(-1)
        for b in torch.nonzero(torch.isnan(scores).any(-1) | ~torch.isfinite(top)).flatten().tolist():
            self.bad[b] = True
        return scores


class VLLMBackend:
    """vLLM engine fed token IDs (TokensPrompt); log-probs from prompt_logprobs. Prefix caching is on so the
    choices of one context can share its KV blocks where vLLM allows it."""

    name = "vllm"

    def __init__(self, model_dir, device: str | None = None, dtype: str = "float32", max_length: int | None = None,
                 tensor_parallel_size: int = 1, tokenizer_dir=None, kv_cache_gb: float | None = None, **engine_kw):
        try:
            from vllm import LLM
        except Exception as e:  # noqa: BLE001 - not installed, or torchvision wheels for another torch (setup.sh)
            raise EvalError(f"backend vllm: cannot import vllm ({e}); install mergescale[vllm] "
                            "or use --backend hf") from None
        self.tokenizer, cfg = load_tokenizer(model_dir, tokenizer_dir)
        self.max_length = model_max_length(cfg, max_length)  # below the positions: vLLM appends an output token
        kw = dict(model=str(model_dir), tokenizer=str(tokenizer_dir or model_dir), dtype=dtype,
                  max_model_len=self.max_length + 1, enable_prefix_caching=True, trust_remote_code=False, seed=0,
                  tensor_parallel_size=tensor_parallel_size,
                  # inside a Ray actor vLLM must not start a nested Ray executor
                  distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp")
        if not torch.cuda.is_available():
            kw["enforce_eager"] = True  # CPU: no graph capture
            # vLLM's CPU default sizes the KV cache from free memory (20 GB here, killed for memory with other
            # work running); a scoring run needs little: VLLM_CPU_KVCACHE_SPACE (GiB), 2 unless set or asked.
            kv_env = str(max(1, round(kv_cache_gb))) if kv_cache_gb else os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")
            kw.setdefault("max_num_seqs", 16)
        elif kv_cache_gb:
            kw["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        kw.update(engine_kw)
        # vLLM's CPU platform exports LD_PRELOAD (torch's libgomp, its tcmalloc) into os.environ for the engine
        # processes it spawns here; left set, every later subprocess of the caller (Ray, shells) would preload them.
        # The KV-cache size is this engine's only.
        saved = {k: os.environ.get(k) for k in ("LD_PRELOAD", "VLLM_CPU_KVCACHE_SPACE")}
        if not torch.cuda.is_available():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = kv_env  # read while the engine starts
        # vLLM runs the engine in a child process (EngineCore) that waits for its client forever: if this process
        # is killed (SIGTERM, SIGKILL, the OOM killer, ray.kill of a replica) it would keep the model and its KV
        # cache. A reaper watching this process kills the engine's processes as soon as it is gone.
        me = psutil.Process()
        before = {c.pid for c in me.children()}
        try:
            self.llm = LLM(**kw)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        engine = [c.pid for c in me.children() if c.pid not in before]
        self._reaper = reaper.watch(engine) if engine else None

    def loglikelihood(self, requests: list[RankRequest]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        flat = [(i, j, c, k) for i, r in enumerate(requests)
                for j, (c, k) in enumerate(zip(r.contexts, r.continuations))]
        # longest first; choices of one context adjacent so their prefix blocks are reused
        flat.sort(key=lambda x: (-len(x[2]), x[0], x[1]))
        prompts = [TokensPrompt(prompt_token_ids=list(c) + list(k)) for _, _, c, k in flat]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out = [[0.0] * len(r.continuations) for r in requests]
        for (i, j, c, k), res in zip(flat, results):
            lps = res.prompt_logprobs
            ids = list(c) + list(k)
            out[i][j] = float(sum(lps[p][ids[p]].logprob for p in range(len(c), len(ids))))
        return out

    def close(self, timeout: float = 60.0) -> None:
        """Stop the engine's processes now and wait for them. Left to interpreter exit, vLLM gives its engine
        process 5 s before killing it; on a busy CPU that was too short, and the process then aborted with
        status 134 ("terminate called without an active exception") after a complete run."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown(timeout=timeout)
        except Exception as e:  # noqa: BLE001 - the engine may already be down
            log.debug("vLLM engine shutdown: %s", e)

    def generate(self, requests: list[GenRequest]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = self.tokenizer.eos_token_id
        # logprobs=0: each generated token's own log-prob comes back, so non-finite logits are seen
        params = [SamplingParams(max_tokens=r.max_new_tokens, temperature=0.0, detokenize=False, logprobs=0,
                                 stop_token_ids=[eos] if eos is not None else None) for r in requests]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(r.context)) for r in requests], params,
                                    use_tqdm=False)
        out = []
        for res in results:
            o = res.outputs[0]
            toks = list(o.token_ids)
            finite = all(math.isfinite(lp[t].logprob) for t, lp in zip(toks, o.logprobs or []))
            out.append(None if not finite else toks[:toks.index(eos)] if eos in toks else toks)
        return out


def make_backend(name: str, model_dir, **kw):
    if name == "hf":
        return HFBackend(model_dir, **kw)
    if name == "vllm":
        return VLLMBackend(model_dir, **kw)
    raise EvalError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
