"""The three recipes: what each trains on. They share the trainer (trainer.py); only the data differs.

- expert:    one held-in task category (all its datasets, all their templates), e.g. tasks: [held-in:sentiment]
- multitask: a mixture of held-in categories (default: all of them), examples-proportional with a cap
- instruct:  an instruction mixture from tasks and/or JSONL files, refused if an evaluation task leaks into it

All checks run here, on the driver, before any worker starts or any output is written.
"""

from __future__ import annotations

from mergescale.config import ConfigError
from mergescale.training.config import TrainConfig, check_recipe
from mergescale.training.data import (
    MixtureSchedule,
    Source,
    check_no_leak,
    file_source,
    fingerprint,
    resolve_tasks,
    split_validation,
    task_source,
)


def expert_sources(cfg: TrainConfig, chat) -> list[Source]:
    tasks = resolve_tasks(cfg.tasks)
    categories = sorted({t.category for t in tasks})
    if len(categories) != 1:
        raise ConfigError(f"recipe expert: tasks {cfg.tasks} span categories {categories}; an expert trains on one")
    return [task_source(t, cfg.data_dir, cfg.max_unscorable, chat) for t in tasks]


def multitask_sources(cfg: TrainConfig, chat) -> list[Source]:
    tasks = resolve_tasks(cfg.tasks or ["held-in"])
    return [task_source(t, cfg.data_dir, cfg.max_unscorable, chat) for t in tasks]


def instruct_sources(cfg: TrainConfig, chat) -> list[Source]:
    tasks = resolve_tasks(cfg.tasks) if cfg.tasks else []
    files = [file_source(p, chat) for p in cfg.data_files]
    # Before any data is read for training: the paper's IT base is FLAN minus every task it is evaluated on.
    check_no_leak([t.name for t in tasks], {src.name: named for src, named in files}, [src for src, _ in files],
                  cfg.eval_selectors, cfg.data_dir, by_content=cfg.leak_check == "content")
    return [task_source(t, cfg.data_dir, cfg.max_unscorable, chat) for t in tasks] + [src for src, _ in files]


def register_task_files(paths: list[str]) -> None:
    from mergescale.eval.tasks import TaskError, register_tasks

    for path in paths:
        try:
            register_tasks(path, replace=True)
        except TaskError as e:
            raise ConfigError(f"task_files: {e}") from None


RECIPE_SOURCES = {"expert": expert_sources, "multitask": multitask_sources, "instruct": instruct_sources}


def prepare_data(recipe: str, cfg: TrainConfig) -> tuple[list[Source], list[tuple[str, str]], dict]:
    """(training sources, validation examples, data description for the manifest)."""
    check_recipe(recipe, cfg)
    register_task_files(cfg.task_files)
    chat = None
    if cfg.chat_template:
        from transformers import AutoTokenizer

        chat = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.base)
        if not chat.chat_template:
            raise ConfigError(f"chat_template: the tokenizer of {cfg.tokenizer or cfg.base} has no chat template")
    sources = RECIPE_SOURCES[recipe](cfg, chat)
    train, val = split_validation(sources, cfg.validation_size, cfg.seed)
    rates = MixtureSchedule([len(s.examples) for s in train], cfg.mixture_cap, cfg.seed).mixing_rates()
    info = {
        "fingerprint": fingerprint(train + [Source("<validation>", val)]),
        "sources": [{"name": s.name, "examples": len(s.examples), "rate": round(r, 6)} for s, r in zip(train, rates)],
        "validation_examples": len(val),
        "mixture_cap": cfg.mixture_cap,
        "prompt_format": "chat" if cfg.chat_template else "raw",
    }
    return train, val, info
