"""The scoring rule every backend shares: token-level context/choice split, truncation, and the metrics.

Rank classification (T0's rule): the prediction is the choice with the largest summed log-prob of its tokens
given the context; `acc_norm` divides that sum by the choice's character length (lm-eval's rule). The text
scored is input + target_delimiter + choice; any whitespace at the end of the context moves into the choice.
The split is lm-eval's for decoder-only models: the model is conditioned on the context's own tokens
`tok(context)` (what it sees at generation time), and the choice's tokens are `tok(context + choice)` past
`len(tok(context))`. Where a BPE merge crosses the boundary, tok(context) + those tokens is not the
tokenization of the whole string; cutting the whole string's tokens instead would condition on a context
the model never sees when prompted. Inputs longer than the model's window are truncated from the left so that
the longest choice still fits.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

from mergescale.eval.tasks import PromptedExample


@dataclass
class RankRequest:
    """One example: per choice, (context ids, continuation ids). The rule gives every choice the same context
    (backends share its computation); backends still accept different ones."""

    contexts: list[list[int]]
    continuations: list[list[int]]


@dataclass
class GenRequest:
    context: list[int]
    max_new_tokens: int


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _prefix_id(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if t is not None:
            return t
    return 0


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as the user's turn of the tokenizer's chat template, ending where the assistant's answer starts
    (instruction-tuned bases; the paper prompts with the raw text). ValueError when there is no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template (chat_template in tokenizer_config.json / "
                         "chat_template.jinja); use raw prompts")
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and getattr(tokenizer, "add_bos_token", False) and out.startswith(bos):
        out = out[len(bos):]  # encoding adds it once more
    return out


def split_context_choice(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(tok(context), tok(context + choice)[len(tok(context)):]): lm-eval's split (module docstring)."""
    n = len(context) - len(context.rstrip())
    if n:  # "Answer: " + "yes" is scored as "Answer:" + " yes" (leading-space tokens in BPE vocabularies)
        context, choice = context[:-n], context[-n:] + choice
    ctx = _encode(tokenizer, context)
    cont = _encode(tokenizer, context + choice)[len(ctx):]
    if not cont:
        raise ValueError(f"choice {choice!r} encodes to no tokens after context {context[-40:]!r}")
    if not ctx:  # nothing to condition the first choice token on (no BOS): condition on a start token
        ctx = [_prefix_id(tokenizer)]
    return ctx, cont


def rank_request(tokenizer, ex: PromptedExample, max_length: int) -> RankRequest:
    pairs = [split_context_choice(tokenizer, ex.input, ex.target_delimiter + c) for c in ex.choices]
    longest = max(len(c) for _, c in pairs)
    if longest >= max_length:
        raise ValueError(f"example {ex.example_id}: a choice is {longest} tokens, over the model's max length "
                         f"{max_length}")
    keep = max_length - longest
    return RankRequest([c[-keep:] for c, _ in pairs], [k for _, k in pairs])


def gen_request(tokenizer, ex: PromptedExample, max_length: int, max_new_tokens: int) -> GenRequest:
    ids = _encode(tokenizer, ex.input) or [_prefix_id(tokenizer)]
    keep = max(1, max_length - max_new_tokens)
    return GenRequest(ids[-keep:], max_new_tokens)


def rank_prediction(logprobs: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """(argmax of summed log-prob, argmax of log-prob per character); ties go to the first choice."""
    pred = max(range(len(logprobs)), key=lambda i: (logprobs[i], -i))
    normed = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices)]
    pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
    return pred, pred_norm


# -- generation metrics ---------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """SQuAD normalization: lower case, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, references) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(r) for r in references))


def _f1(pred_toks: list[str], ref_toks: list[str]) -> float:
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    common = Counter(pred_toks) & Counter(ref_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    p, r = same / len(pred_toks), same / len(ref_toks)
    return 2 * p * r / (p + r)


def f1_score(prediction: str, references) -> float:
    """SQuAD token F1 (max over references)."""
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(r).split()) for r in references)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _rouge_tokens(s: str) -> list[str]:
    # rouge-score's default tokenizer: lower case, non-alphanumerics become spaces
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).split()


def rouge_l(prediction: str, references) -> float:
    """ROUGE-L F-measure (sentence-level LCS, beta=1), max over references."""
    best = 0.0
    p = _rouge_tokens(prediction)
    for ref in references:
        r = _rouge_tokens(ref)
        lcs = _lcs(p, r)
        if lcs:
            prec, rec = lcs / len(p), lcs / len(r)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


GEN_METRICS = {"exact_match": exact_match, "f1": f1_score, "rouge_l": rouge_l}
