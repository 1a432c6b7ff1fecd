"""Facts for policy about structured arguments, computed by parsers.

A tool's catalog entry names the arguments whose text is structured
(`formats: {query: sql}`); for each one the call carries, the sidecar puts
what a parser found into the policy input at `tool.facts.<argument>`, so the
rules judge what the text would do rather than the words it contains
(docs/policy-input.md, docs/policy-authoring.md).

Formats: "sql" (sidecar.policy.facts.sql, PostgreSQL's parser), "url"
(sidecar.policy.facts.url, yarl as aiohttp uses it), "path"
(sidecar.policy.facts.path, segments as file systems read them). A format
this module does not know, or a value that is not a string, gives
`{"format": ..., "parsed": false, "error": ...}`: policy treats unparsed
text as unknown and escalates or denies it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from sidecar.policy.facts import path, sql, url

PARSERS: dict[str, Callable[[str], dict[str, Any]]] = {"sql": sql.sql_facts, "url": url.url_facts, "path": path.path_facts}
# Each format's facts for text it did not parse (`parsed: false`, `error`, its lists empty).
UNPARSED: dict[str, Callable[[str], dict[str, Any]]] = {"sql": sql.unparsed, "url": url.unparsed, "path": path.unparsed}
# Longer text is not parsed: facts are computed on the event loop, and PostgreSQL's parser with
# the walk of its tree takes a few microseconds a character (a megabyte of SQL held every other
# call for seconds). Policy treats the text as unknown, like text that does not parse.
MAX_PARSED_CHARS = 16 * 1024


def argument_facts(catalog_entry: Mapping[str, Any] | None, arguments: Mapping[str, Any]) -> dict[str, dict]:
    """{argument name: facts} for every argument the entry's `formats` names and the call carries.

    An absent argument gets no facts (the declared-arguments rule deals with
    it); a catalog entry without `formats` (or not an object) gives {}.
    """
    formats = catalog_entry.get("formats") if isinstance(catalog_entry, Mapping) else None
    if not isinstance(formats, Mapping):
        return {}
    facts: dict[str, dict] = {}
    for name, fmt in formats.items():
        if name not in arguments:
            continue
        value = arguments[name]
        parser = PARSERS.get(fmt) if isinstance(fmt, str) else None
        if parser is None:
            facts[name] = {"format": str(fmt), "parsed": False, "error": f"no parser for format {fmt!r}"}
        elif not isinstance(value, str):
            facts[name] = {"format": fmt, "parsed": False, "error": "the argument is not a string"}
        elif len(value) > MAX_PARSED_CHARS:
            facts[name] = UNPARSED[fmt](
                f"the text is {len(value)} characters, over the {MAX_PARSED_CHARS} the sidecar parses"
            )
        else:
            facts[name] = parser(value)
    return facts
