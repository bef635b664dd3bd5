"""Prompt templates: a task's jinja "input ||| target" and answer choices applied to a data row, strictly.

A row that lacks a value its template reads (a missing column, a null) is a DataError: the data file is wrong.
A row that renders but cannot be scored (a label that indexes no answer choice, no target, a target that is not
among the choices, two equal choices) comes back as the reason why, so callers count it instead of dropping it
without a word. Undefined values never render as empty strings, nulls never as "None", and `int` never turns
an unparsable label into 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from jinja2 import StrictUndefined, UndefinedError, meta
from jinja2.utils import missing

_SEP = "|||"


class TaskError(ValueError):
    """Unknown task, bad task YAML, or missing data; the message says what to do."""


@dataclass(frozen=True)
class PromptedExample:
    example_id: str
    input: str
    target: str
    choices: tuple[str, ...] | None = None  # rank classification candidates (None: generation task)
    label: int | None = None  # index of the gold choice
    references: tuple[str, ...] = ()  # gold strings for generation metrics
    target_delimiter: str = " "  # text between input and an answer (input + delimiter + choice)


class DataError(TaskError):
    """A row lacks a value its template reads (a missing column, a null, a missing field): an error in the data
    file, never a row to skip. Task.render_rows adds the task, file and row."""


class _MissingValue(UndefinedError):
    """A template read something the row does not have; `obj` is where it looked (jinja's `missing`: a name)."""

    def __init__(self, message: str, obj=None, name=None):
        super().__init__(message)
        self.obj, self.name = obj, name


class _StrictUndefined(StrictUndefined):
    # Undefined values must never render as empty strings (a missing `choice2` would become an empty choice):
    # any use of one raises, with what was read, so render() can tell a bad label from a missing column.
    __slots__ = ()

    def __init__(self, hint=None, obj=missing, name=None, exc=UndefinedError):
        super().__init__(hint, obj, name, exc)
        self._undefined_exception = partial(_MissingValue, obj=obj, name=name)


class _NullValue(Exception):
    pass


def _finalize(value):
    if value is None:  # a null in the data: jinja would print "None" into the prompt
        raise _NullValue()
    return value


def _strict_int(value, default=None, base=10):
    # jinja's own `int` turns anything unparsable into 0: a label "abc" would silently become choice 0
    try:
        if isinstance(value, str):
            return int(value.strip(), base)
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not an integer") from None


def _jinja_env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed: task YAML can come from users. `choice` is promptsource's random pick; we take the first
    # element so prompts (and cache keys) are deterministic.
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=False, undefined=_StrictUndefined, finalize=_finalize)
    env.filters["choice"] = lambda xs: xs[0] if len(xs) else ""
    env.filters["int"] = _strict_int
    env.globals.update(zip=zip, enumerate=enumerate, range=range, len=len)
    return env


_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        _ENV = _jinja_env()
    return _ENV


def _split_sep(text: str) -> list[str]:
    return [p.strip() for p in text.split(_SEP)]


@dataclass
class Template:
    name: str
    jinja: str
    answer_choices: str | None = None
    references: str | None = None
    target_delimiter: str = " "

    def __post_init__(self):
        if self.jinja.count(_SEP) != 1:
            raise TaskError(f"template {self.name!r}: jinja must contain exactly one '|||' (input ||| target)")
        env = _env()
        sources = [x for x in (self.jinja, self.answer_choices, self.references) if x]
        # the row's columns the template reads (answer_choices is ours; zip, range, ... are globals)
        self.columns = sorted(set().union(*(meta.find_undeclared_variables(env.parse(x)) for x in sources))
                              - set(env.globals) - {"answer_choices"})
        self._t = env.from_string(self.jinja)
        self._c = env.from_string(self.answer_choices) if self.answer_choices else None
        self._r = env.from_string(self.references) if self.references else None

    def render(self, example: dict, example_id: str = "") -> PromptedExample | None:
        """Prompt one dataset row; None when the row cannot be used (no target, a bad label: see `prompt`).
        DataError when the row lacks a value the template reads."""
        ex = self.prompt(example, example_id)
        return ex if isinstance(ex, PromptedExample) else None

    def prompt(self, example: dict, example_id: str = "") -> PromptedExample | str:
        """Prompt one dataset row, or say why it cannot be scored (a label that indexes no answer choice, no
        target, a target that is not among the choices, ...). DataError when the row lacks a column the template
        reads, or prints a null: the data file is wrong, not the row."""
        absent = [c for c in self.columns if c not in example]
        if absent:
            raise DataError(f"has no column {', '.join(map(repr, absent))}, which template {self.name!r} reads")
        choices = None
        try:
            if self._c is not None:
                choices = tuple(_split_sep(self._c.render(**example)))
            answer_choices = list(choices or ())
            text = self._t.render(**example, answer_choices=answer_choices)
            refs = tuple(r for r in _split_sep(self._r.render(**example)) if r) if self._r else None
        except _NullValue:
            nulls = [c for c in self.columns if example.get(c) is None]
            raise DataError(f"has no value (null or absent) in column {', '.join(map(repr, nulls))}, which template "
                            f"{self.name!r} prints" if nulls else f"has a null where template {self.name!r} prints one"
                            ) from None
        except _MissingValue as e:
            if choices is not None and e.obj is answer_choices:
                return f"answer_choices[{e.name!r}] does not exist (the row has {len(choices)} answer choices)"
            raise DataError(f"lacks a value template {self.name!r} reads: {e}") from None
        except (TypeError, ValueError) as e:  # e.g. a label `int` cannot parse, a column of the wrong type
            return f"template {self.name!r} cannot render it: {e}"
        inp, _, target = text.partition(_SEP)
        inp, target = inp.strip(), target.strip()
        if not target:
            return "no target (an unlabelled row)"
        if not inp:
            return "empty input"
        label = None
        if choices is not None:
            for j, c in enumerate(choices):
                if not c:
                    return f"answer choice {j} is empty"
                if c in choices[:j]:
                    # equal choices score equally and ties go to the first: a gold first copy would always win
                    return f"answer choices {choices.index(c)} and {j} are the same ({c!r})"
            if target not in choices:
                return f"target {target!r} is not among the answer choices"
            label = choices.index(target)
        if refs is not None and not refs:
            return "no reference answers"
        return PromptedExample(str(example_id), inp, target, choices, label, refs or (target,), self.target_delimiter)


@dataclass
class Rendered:
    """A split prompted with one template: the examples, and the rows that cannot be scored (id, why)."""

    examples: list[PromptedExample]
    unscorable: list[tuple[str, str]]
    rows: int  # rows read (all of them, or up to `limit` examples)

    def check(self, task: str, max_fraction: float, where, option: str) -> None:
        """TaskError naming the task, the count and the first rows when more than max_fraction of the rows
        read cannot be scored (0: any). `where(example_id)` locates a row; `option` is how to allow more."""
        n = len(self.unscorable)
        if n == 0 or n <= max_fraction * self.rows:
            return
        first = "; ".join(f"{where(int(i))}: {why}" for i, why in self.unscorable[:3])
        raise TaskError(f"task {task!r}: {n} of {self.rows} rows cannot be scored, more than {option} "
                        f"{max_fraction:g} allows (a fraction of the rows). First: {first}")
