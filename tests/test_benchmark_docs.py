"""benchmarks/_common.replace_section: `--write-doc` replaces a section's generated part (command, setup, table)
and keeps what was written by hand below it, and every other section."""

import importlib.util

from tests.helpers import REPO


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc(marker: str) -> str:
    return f"""# Benchmarks

intro

## Single-process merge

Command: old

| a |
|---|
| 1 |

{marker}

Hand-written reading of the old table.

#### Previous table (abc123)

| a |
|---|
| 0 |

### Where the time goes

A measured breakdown.

## Distributed merge

Untouched section.
"""


def _hand_written(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and "Command" not in line and not line.startswith("| ")]


def test_write_doc_keeps_the_hand_written_text_after_the_marker(tmp_path):
    C = _common()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(_doc(C.GENERATED_END))
    C.replace_section(doc, "Single-process merge", "Command: new\n\n| b |\n|---|\n| 2 |\n", "# Benchmarks")
    text = doc.read_text()
    assert "Command: old" not in text and "| 1 |" not in text
    assert "Command: new" in text and "| 2 |" in text
    # every hand-written line survives, in its order, and the generated part comes before it
    before = [line for line in _hand_written(_doc(C.GENERATED_END)) if line != "| 1 |"]
    assert _hand_written(text) == before
    assert text.index("| 2 |") < text.index(C.GENERATED_END) < text.index("Hand-written reading")
    assert text.count(C.GENERATED_END) == 1
    # a second run replaces its own output again, with nothing added or lost
    C.replace_section(doc, "Single-process merge", "Command: newer\n\n| c |\n|---|\n| 3 |\n", "# Benchmarks")
    again = doc.read_text()
    assert again == text.replace("Command: new", "Command: newer").replace("| b |", "| c |").replace("| 2 |", "| 3 |")


def test_a_section_without_the_marker_keeps_its_subsections(tmp_path):
    C = _common()
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(_doc(""))
    C.replace_section(doc, "Single-process merge", "Command: new\n\n| b |\n|---|\n| 2 |\n", "# Benchmarks")
    text = doc.read_text()
    # the reading right under the old table had no marker to say it was hand-written: it goes with the table
    assert "Hand-written reading" not in text and "Command: old" not in text
    for kept in ("#### Previous table (abc123)", "| 0 |", "### Where the time goes", "A measured breakdown.",
                 "## Distributed merge", "Untouched section."):
        assert kept in text
    assert text.index("| 2 |") < text.index(C.GENERATED_END) < text.index("#### Previous table")
    assert "\n\n## Distributed merge" in text


def test_a_missing_doc_or_section_is_created(tmp_path):
    C = _common()
    doc = tmp_path / "docs" / "BENCHMARKS.md"
    C.replace_section(doc, "New", "| x |\n|---|\n| 9 |\n", "# Benchmarks\n\nintro")
    C.replace_section(doc, "Other", "| y |\n|---|\n| 8 |\n", "# Benchmarks\n\nintro")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.index("## New") < text.index("| 9 |") < text.index("## Other") < text.index("| 8 |")
    assert text.count(C.GENERATED_END) == 2
