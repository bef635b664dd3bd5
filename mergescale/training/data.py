"""Training data building blocks: sources from the eval task registry or JSONL files, the leak check, tokenization
with loss on target tokens only, and a mixture schedule whose batches are a pure function of (seed, step).

The schedule is what makes resume exact: a restarted run asks for the batch of step k and gets the same examples
in the same order, with no sampler state to save.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mergescale.config import ConfigError

IGNORE = -100  # label value the loss skips (the prompt and padding)


@dataclass
class Source:
    """One mixture component: a task (all its templates) or a data file, as (input, target) text pairs."""

    name: str
    examples: list[tuple[str, str]]


# -- sources ----------------------------------------------------------------------------------------------------
def resolve_tasks(specs: list[str]) -> list:
    """Task objects for names or selectors (held-in, held-in:sentiment, "copa,rte", ...), in order, no duplicates."""
    from mergescale.eval.tasks import TaskError, tasks_for

    try:
        return tasks_for([part for spec in specs for part in spec.split(",")])
    except TaskError as e:
        raise ConfigError(f"tasks: {e}") from None


def _pair(inp: str, target: str, delimiter: str, chat_tokenizer) -> tuple[str, str]:
    """(input, continuation) as the evaluator scores them: raw, input + delimiter + target; with a chat
    tokenizer, the input in its chat template and the target as the assistant's answer."""
    if chat_tokenizer is None:
        return inp, delimiter + target
    from mergescale.eval.scoring import chat_prompt

    return chat_prompt(chat_tokenizer, inp), target


def task_source(task, data_dir: str | None, max_unscorable: float = 0.0, chat_tokenizer=None) -> Source:
    """Every train row rendered with every template of the task (T0 trains on all prompts of a dataset).
    The continuation is target_delimiter + target: the text the evaluator scores after the input. ConfigError
    when a row lacks a column a template reads, or when more than `max_unscorable` of the prompts (rows x
    templates) cannot be used (no target, a label out of range, ...): a dropped row is never silent."""
    from mergescale.eval.tasks import Rendered, TaskError

    if not task.train_split:
        raise ConfigError(f"tasks: task {task.name!r} has no train_split to train on")
    try:
        rows = task.load(task.train_split, data_dir)
        rendered = [task.render_rows(rows, t.name, split=task.train_split, data_dir=data_dir) for t in task.templates]
        # row by row, each row's templates in order (the order the data fingerprint and the schedule see)
        examples = sorted(((int(e.example_id), k), e) for k, r in enumerate(rendered) for e in r.examples)
        every = Rendered([e for _, e in examples], [u for r in rendered for u in r.unscorable],
                         sum(r.rows for r in rendered))
        every.check(task.name, max_unscorable, lambda i: task.row_origin(task.train_split, data_dir, i),
                    "max_unscorable")
    except TaskError as e:
        raise ConfigError(f"tasks: {e}") from None
    if not every.examples:
        raise ConfigError(f"tasks: task {task.name!r} has no labelled examples in split {task.train_split!r}")
    return Source(task.name, [_pair(e.input, e.target, e.target_delimiter, chat_tokenizer) for e in every.examples])


def file_source(path: str | Path, chat_tokenizer=None) -> tuple[Source, list[str]]:
    """Rows {"input": str, "target": str, "task": str, "target_delimiter": str} (the last two optional) from a
    JSONL file; returns the source and the task names its rows claim."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data_files: {path} does not exist")
    examples, named = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"data_files: {path}:{lineno}: not valid JSON: {e}") from None
            if not (isinstance(row, dict) and isinstance(row.get("input"), str)
                    and isinstance(row.get("target"), str)):
                raise ConfigError(f"data_files: {path}:{lineno}: each row needs string fields 'input' and 'target'")
            empty = [k for k in ("input", "target") if not row[k].strip()]
            if empty:  # an empty prompt or an empty answer trains on nothing the evaluator asks
                raise ConfigError(f"data_files: {path}:{lineno}: field {empty[0]!r} is empty")
            if not isinstance(row.get("target_delimiter", " "), str):
                raise ConfigError(f"data_files: {path}:{lineno}: 'target_delimiter' must be a string")
            examples.append(_pair(row["input"], row["target"], row.get("target_delimiter", " "), chat_tokenizer))
            if isinstance(row.get("task"), str):
                named.append(row["task"])
    if not examples:
        raise ConfigError(f"data_files: {path} holds no rows")
    return Source(str(path), examples), named


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def check_no_leak(task_names: list[str], files: dict[str, list[str]], file_sources: list[Source],
                  eval_selectors: list[str], data_dir: str | None, by_content: bool) -> None:
    """Refuse an instruction mixture that contains an evaluation task: by task name (tasks, or a data file row's
    'task' field) and, with by_content, by any data file input equal to a rendered evaluation prompt."""
    eval_tasks = resolve_tasks(eval_selectors) if eval_selectors else []
    eval_names = {t.name for t in eval_tasks}
    for name in task_names:
        if name in eval_names:
            raise ConfigError(f"instruct mixture leaks evaluation task {name!r} (matched by eval_selectors "
                              f"{eval_selectors}); remove it from 'tasks'")
    for path, named in files.items():
        for name in named:
            if name in eval_names:
                raise ConfigError(f"instruct mixture leaks evaluation task {name!r}: data file {path} has rows "
                                  f"labelled task={name!r}")
    if not by_content or not file_sources:
        return
    from mergescale.eval.tasks import TaskError

    for task in eval_tasks:
        prompts = set()
        for split in filter(None, dict.fromkeys((task.eval_split, task.train_split))):
            try:
                rows = task.load(split, data_dir)
                prompts.update(_norm(e.input) for t in task.templates
                               for e in task.render_rows(rows, t.name, split=split, data_dir=data_dir).examples)
            except TaskError as e:  # hub/offline/missing files/bad rows all mean: cannot check by content
                raise ConfigError(f"leak check: cannot read evaluation task {task.name!r} split {split!r} to compare "
                                  f"contents ({e}); set data_dir, or leak_check: names") from None
        for src in file_sources:
            hits = sum(_norm(inp) in prompts for inp, _ in src.examples)
            if hits:
                raise ConfigError(f"instruct mixture leaks evaluation task {task.name!r}: data file {src.name} "
                                  f"contains {hits} of its prompts")


def fingerprint(sources: list[Source]) -> str:
    """sha256 over every source's name and examples, in order: identical data gives an identical fingerprint."""
    h = hashlib.sha256()
    for s in sources:
        h.update(f"{s.name}\0{len(s.examples)}\0".encode())
        for inp, tgt in s.examples:
            h.update(inp.encode() + b"\0" + tgt.encode() + b"\0")
    return h.hexdigest()


def split_validation(sources: list[Source], n: int, seed: int) -> tuple[list[Source], list[tuple[str, str]]]:
    """Hold out n examples (spread over sources by size, chosen with the seed) for validation loss."""
    if n == 0:
        return sources, []
    total = sum(len(s.examples) for s in sources)
    if n >= total:
        raise ConfigError(f"validation_size ({n}) must be below the number of training examples ({total})")
    rng = np.random.default_rng([seed, 7])
    picked = set(rng.choice(total, size=n, replace=False).tolist())
    train, val, offset = [], [], 0
    for s in sources:
        keep = []
        for i, ex in enumerate(s.examples):
            (val if offset + i in picked else keep).append(ex)
        offset += len(s.examples)
        if not keep:
            raise ConfigError(f"validation_size ({n}) leaves source {s.name!r} without training examples")
        train.append(Source(s.name, keep))
    return train, val


# -- tokenization -----------------------------------------------------------------------------------------------
def encode(tokenizer, inp: str, continuation: str, max_input_len: int,
           max_output_len: int) -> tuple[list[int], list[int]]:
    """input_ids and labels of input + continuation + EOS, labels IGNORE on the input. Tokenized exactly as the
    evaluator scores a choice (eval.scoring.split_context_choice: the input's own tokens, then the tokens of
    input + continuation past them), so training and rank classification see the same tokens. The input is cut from
    the left (the instruction cue just before the answer survives), the target from the right."""
    from mergescale.eval.scoring import split_context_choice

    ctx, tgt = split_context_choice(tokenizer, inp, continuation)
    if tokenizer.eos_token_id is not None:
        tgt = tgt + [tokenizer.eos_token_id]
    ctx, tgt = ctx[-max_input_len:], tgt[:max_output_len]
    return ctx + tgt, [IGNORE] * len(ctx) + tgt


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE on padding)."""
    n = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), n), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(encoded), n), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_token_count(labels: torch.Tensor) -> int:
    """Tokens the loss is taken on (labels are shifted by one inside the loss, so the first position never counts)."""
    return int((labels[:, 1:] != IGNORE).sum())


# -- mixture schedule -------------------------------------------------------------------------------------------
class MixtureSchedule:
    """Examples-proportional mixing with a cap, as a pure function of (seed, step).

    One "epoch" of the mixture holds min(len(source), cap) examples of each source (which ones: a permutation of
    that source seeded by (seed, epoch)), shuffled together with (seed, epoch). Global position p of the stream is
    epoch p // epoch_len, offset p % epoch_len; step s's global batch is positions [s*B, (s+1)*B).
    """

    def __init__(self, sizes: list[int], cap: int | None, seed: int):
        self.sizes, self.seed = list(sizes), seed
        self.quota = [min(n, cap) if cap else n for n in self.sizes]
        self.epoch_len = sum(self.quota)

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of schedules live per process
    def epoch(self, e: int) -> np.ndarray:
        """(source, index) pairs of epoch e, shape (epoch_len, 2)."""
        parts = []
        for k, (n, q) in enumerate(zip(self.sizes, self.quota)):
            idx = np.random.default_rng([self.seed, e, k]).permutation(n)[:q] if q < n else np.arange(n)
            parts.append(np.stack([np.full(q, k), idx], axis=1))
        pairs = np.concatenate(parts)
        return pairs[np.random.default_rng([self.seed, e, 1 << 20]).permutation(len(pairs))]

    def batch(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """The global batch of a step: batch_size (source, index) pairs."""
        out = []
        for p in range(step * batch_size, (step + 1) * batch_size):
            e, off = divmod(p, self.epoch_len)
            s, i = self.epoch(e)[off]
            out.append((int(s), int(i)))
        return out

    def mixing_rates(self) -> list[float]:
        return [q / self.epoch_len for q in self.quota]
