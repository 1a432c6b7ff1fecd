"""URL and path arguments judged by their parsers (issue 11 §8), with the shipped rules in real OPA.

Facts from sidecar/policy/facts/url.py (yarl, as aiohttp parses) and path.py;
decisions by `opa eval` on rego/ for the input document the sidecar builds.
"""

from __future__ import annotations

import json

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from sidecar.policy.facts.path import path_facts
from sidecar.policy.facts.url import url_facts
from tests.test_policy_facts_sql import opa_decide, tool_input

RESEARCH_AGENT = "spiffe://example.org/ns/agents/sa/research-agent"


def decide(tool: str, arguments: dict) -> dict:
    return opa_decide(tool_input(tool, arguments, RESEARCH_AGENT))


@pytest.mark.parametrize(
    ("text", "host", "userinfo", "ambiguous"),
    [
        ("https://docs.example.org/guide?x=1", "docs.example.org", False, False),
        ("HTTPS://PyPI.org/simple/", "pypi.org", False, False),
        ("https://example.org:443@evil.com/", "evil.com", True, False),
        ("https://evil.com#@example.org", "evil.com", False, False),
        ("https://exam\tple.org/", "example.org", False, True),
        ("https://b\u00fccher.example/", "xn--bcher-kva.example", False, True),
        ("https://%65xample.org/", "%65xample.org", False, True),
    ],
)
def test_url_facts_name_the_host_the_client_connects_to(text, host, userinfo, ambiguous):
    facts = url_facts(text)
    assert facts["parsed"] is True and facts["scheme"] == "https"
    assert (facts["host"], facts["userinfo"], facts["ambiguous"]) == (host, userinfo, ambiguous)


@pytest.mark.parametrize("text", ["example.org", "https:example.org", "https://example.org\\@evil.com/", "https://example.org:99999/", ""])
def test_unusable_urls_are_not_parsed(text):
    facts = url_facts(text)
    assert facts["parsed"] is False and facts["error"]


@pytest.mark.parametrize(
    ("text", "traversal", "ambiguous"),
    [
        ("/workspace/notes/a.txt", False, False),
        ("/workspace/../etc/passwd", True, False),
        ("/workspace/%2e%2e/etc/passwd", True, False),
        ("/workspace/%2E%2e/x", True, False),
        ("/workspace/\u2025/etc", True, False),
        ("/workspace\\..\\x", True, True),
        ("/workspace/a..b/...", False, False),
        ("/workspace/a\nb", False, True),
        # a reading that makes a separator: a tool that decodes reads "../.." (found by the redteam review)
        ("/workspace/..%2f..%2fetc/passwd", True, False),
        ("/workspace/%2e%2e%2f%2e%2e%2fetc/passwd", True, False),
        ("/workspace/..%5C..%5Cetc", True, False),
        ("/workspace/..\uff0f..\uff0fetc/passwd", True, False),  # U+FF0F fullwidth solidus folds to "/"
        ("/workspace/\u2025\uff0fetc", True, False),
        ("/workspace/%252e%252e/etc", True, False),  # decoded twice
        ("/workspace/\uff05\uff12\uff45\uff05\uff12\uff45/etc", True, False),  # fullwidth "%2e%2e"
        ("/workspace/%2e/x", False, False),
        ("/workspace/50%25/a..b", False, False),
    ],
)
def test_path_facts(text, traversal, ambiguous):
    facts = path_facts(text)
    assert (facts["traversal"], facts["ambiguous"]) == (traversal, ambiguous)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_url_and_path_facts_never_raise(text):
    for facts in (url_facts(text), path_facts(text)):
        json.dumps(facts)
        assert isinstance(facts["parsed"], bool)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.org:443@evil.com/",
        "https://evil.com#@example.org",
        "https://example.org\\@evil.com/",
        "https://exam\tple.org/",
        "https://\u0435xample.org/",  # Cyrillic е
        "https://%65xample.org/",
        "http://example.org/",
        "https://169.254.169.254/latest/meta-data",
    ],
)
def test_shipped_rules_deny_url_tricks(url):
    decision = decide("http_get", {"url": url})
    assert decision["outcome"] == "deny"
    assert any(r.startswith('url_not_allowed: argument "url" of tool "http_get"') for r in decision["reasons"]), decision


@pytest.mark.parametrize("path", [
    "/workspace/%2e%2e/etc/shadow", "/workspace/\u2025/etc/shadow", "/workspace\\..\\etc",
    "/workspace/..%2f..%2fetc/shadow", "/workspace/%2e%2e%2fetc/shadow", "/workspace/..\uff0f..\uff0fetc/shadow",
])
def test_shipped_rules_deny_hidden_traversal(path):
    decision = decide("read_file", {"path": path})
    assert decision["outcome"] == "deny"
    assert 'path_traversal: argument "path" of tool "read_file" has a ".." segment' in decision["reasons"]


def test_shipped_rules_allow_plain_urls_and_paths():
    assert decide("http_get", {"url": "https://docs.example.org/guide?x=1"})["outcome"] == "allow"
    assert decide("read_file", {"path": "/workspace/notes/a.txt"})["outcome"] == "allow"


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("read_file", {"path": "/workspace/" + "notes/" * 3000 + "a.txt"}),
        ("http_get", {"url": "https://docs.example.org/guide?" + "x=1&" * 5000}),
        ("run_sql", {"query": "select 1;" * 2000}),
    ],
)
def test_text_too_long_to_parse_is_never_allowed(tool, arguments):
    """Over MAX_PARSED_CHARS the sidecar does not parse (it would hold the event loop): policy sees
    `parsed: false` with the reason, and the shipped rules do not allow what they cannot read."""
    from sidecar.policy.facts import MAX_PARSED_CHARS, argument_facts
    from tests.test_policy_facts_sql import CATALOG

    (name, text), = arguments.items()
    assert len(text) > MAX_PARSED_CHARS
    facts = argument_facts(CATALOG[tool], arguments)[name]
    assert facts["parsed"] is False and f"over the {MAX_PARSED_CHARS}" in facts["error"]
    assert decide(tool, arguments)["outcome"] != "allow"
    within = {name: text[: MAX_PARSED_CHARS - MAX_PARSED_CHARS % 9]}  # up to the limit it is parsed (9: "select 1;")
    assert argument_facts(CATALOG[tool], within)[name]["parsed"] is True


@pytest.mark.parametrize("arguments", [
    {"path": "/workspace/notes/a.txt", "PATH": "/etc/shadow"},
    {"path": "/workspace/notes/a.txt", "Path": "/etc/shadow"},
])
def test_shipped_rules_deny_another_spelling_of_a_judged_argument(arguments):
    """Found by the redteam review: the rules judged `path` while a tool that reads names without case
    (or whose last key wins) would open `PATH`; the call was allowed."""
    decision = decide("read_file", arguments)
    assert decision["outcome"] == "deny", decision
    assert any(r.startswith('ambiguous_argument: argument "P') for r in decision["reasons"]), decision
