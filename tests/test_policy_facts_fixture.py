"""rego/sidecar/tests/facts/data.json holds what the sidecar's parsers say about the texts the policy tests use.

The Rego tests cannot run the parsers, so their fixture (`tool()` in
fixtures_test.rego) attaches facts from this file, keyed by format and text:
the rules are tested on exactly the facts the sidecar would give them. This
test fails when an entry differs from the parser; regenerate with

    .venv/bin/python -m tests.test_policy_facts_fixture [DIR]

(DIR: a bundle directory other than rego/, e.g. a candidate copy), which
collects every string literal of the Rego tests that could be a path
or a URL. A text missing from the file gets no facts in the Rego tests, so a
test expecting it to pass fails (the rules fail closed).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sidecar.policy.facts import PARSERS
from tests.conftest import REGO

FIXTURE = REGO / "sidecar" / "tests" / "facts" / "data.json"
FORMATS = ("path", "url")  # the Rego SQL tests write their facts out (arguments_test.rego)
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')


def candidate_texts(bundle: Path = REGO) -> dict[str, set[str]]:
    texts: dict[str, set[str]] = {fmt: set() for fmt in FORMATS}
    for test in sorted((bundle / "sidecar" / "tests").glob("*_test.rego")):
        source = re.sub(r"(?m)`[^`]*`|^\s*#.*$", "", test.read_text())  # raw strings and comment lines
        for literal in _LITERAL.findall(source):
            try:
                text = json.loads(f'"{literal}"')
            except json.JSONDecodeError:  # a quote inside a trailing comment
                continue
            if " " in text or text.startswith("spiffe://"):
                continue
            if "://" in text or re.fullmatch(r"[a-z0-9.-]+\.[a-z]+", text):
                texts["url"].add(text)
            elif "/" in text or "\\" in text or ".." in text:
                texts["path"].add(text)
    return texts


def expected(bundle: Path = REGO) -> dict[str, dict[str, dict]]:
    return {fmt: {text: PARSERS[fmt](text) for text in sorted(texts)} for fmt, texts in candidate_texts(bundle).items()}


def test_fixture_facts_are_what_the_parsers_give():
    stored = json.loads(FIXTURE.read_text())
    assert set(stored) == set(FORMATS)
    for fmt, entries in stored.items():
        for text, facts in entries.items():
            assert facts == PARSERS[fmt](text), f"{fmt} {text!r}: regenerate with python -m tests.test_policy_facts_fixture"
    assert stored == expected(), "texts were added to the Rego tests: python -m tests.test_policy_facts_fixture"


def refresh(bundle: Path = REGO) -> Path:
    """Write the parsers' facts for every candidate text of BUNDLE's tests into its facts/data.json."""
    if not (bundle / "sidecar" / "tests").is_dir():
        raise SystemExit(f"{bundle}: no sidecar/tests directory (give the bundle directory, e.g. rego)")
    facts = expected(bundle)
    fixture = bundle / "sidecar" / "tests" / "facts" / "data.json"
    fixture.parent.mkdir(exist_ok=True)
    fixture.write_text(json.dumps(facts, indent=1, sort_keys=True, ensure_ascii=True) + "\n")
    print(f"{fixture}: {sum(len(v) for v in facts.values())} texts", file=sys.stderr)
    return fixture


if __name__ == "__main__":
    refresh(Path(sys.argv[1]) if len(sys.argv) > 1 else REGO)
