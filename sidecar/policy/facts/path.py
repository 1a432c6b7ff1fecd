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
      "traversal": false,        a segment is ".." as written, after
                                 percent-decoding (%2e%2e), or after Unicode
                                 compatibility folding (U+2025 "‥" is "..")
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


def _is_parent(segment: str) -> bool:
    decoded = unquote(segment)
    return ".." in {segment, decoded, unicodedata.normalize("NFKC", segment), unicodedata.normalize("NFKC", decoded)}
