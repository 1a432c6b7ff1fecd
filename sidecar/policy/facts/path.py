"""Facts about a file path, split into segments as file systems and tools may read it.

    {
      "format": "path",
      "parsed": true,
      "error": null,
      "absolute": true,          starts with "/"
      "segments": ["workspace", "notes", "a.txt"],
                                 split on "/" and "\\" (Windows and some tools
                                 take "\\" as a separator), empty ones and "."
                                 dropped
      "traversal": false,        a segment is ".." as written, or in any reading
                                 of it a tool may make: percent-decoded (%2e%2e,
                                 up to MAX_DECODES layers: %252e%252e), Unicode
                                 compatibility folded (U+2025 "‥" is ".."), and
                                 split again where such a reading makes a
                                 separator (..%2f.., %2e%2e%5c, ..／.. with
                                 U+FF0F), since a tool that decodes reads those
                                 as "../.."
      "ambiguous": false         a backslash or a control character
    }

A path the tool receives is the text as sent: policy checks prefixes on that
text and refuses any traversal, so the path cannot leave the prefix whatever
the tool does with "..".
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import unquote

FORMAT = "path"
_SEPARATORS = re.compile(r"[/\\]")
_AMBIGUOUS = re.compile(r"[\x00-\x1f\x7f\\]")


def path_facts(text: str) -> dict[str, Any]:
    """Facts about `text`; never raises."""
    segments = [s for s in _SEPARATORS.split(text) if s not in ("", ".")]
    return {
        "format": FORMAT,
        "parsed": True,
        "error": None,
        "absolute": text.startswith("/"),
        "segments": segments,
        "traversal": any(_is_parent(segment) for segment in segments),
        "ambiguous": bool(_AMBIGUOUS.search(text)),
    }


def unparsed(error: str) -> dict[str, Any]:
    """The facts of text that was not parsed (too long): `error` says why."""
    return {"format": FORMAT, "parsed": False, "error": error, "absolute": False, "segments": [], "traversal": False,
            "ambiguous": False}


MAX_DECODES = 3  # layers of percent-encoding taken off (as the evidence redaction does)
_MAX_READINGS = 32  # bounds the readings of one segment (each step shortens it or is a fixed point)


def _readings(segment: str) -> set[str]:
    """The segment as written and as a tool may read it: percent-decoded (up to MAX_DECODES
    layers) and NFKC-folded, in any order (a fullwidth `％２ｅ` folds to `%2e`, then decodes)."""
    seen: set[str] = set()
    todo = [(segment, 0)]
    while todo and len(seen) < _MAX_READINGS:
        text, decodes = todo.pop()
        if text in seen:
            continue
        seen.add(text)
        todo.append((unicodedata.normalize("NFKC", text), decodes))
        if decodes < MAX_DECODES and "%" in text:
            todo.append((unquote(text), decodes + 1))
    return seen


def _is_parent(segment: str) -> bool:
    """A ".." in some reading of the segment, also where that reading makes a separator (`..%2f..`)."""
    return any(".." in _SEPARATORS.split(reading) for reading in _readings(segment))
