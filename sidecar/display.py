"""What a human reads is what will run: text for people, with hidden characters shown and flagged.

Every human-facing surface (the approvals console, `approvals list|show`,
`evidence show`, the webhook's text) passes values from outside through this
module, so a value cannot move the cursor, rewrite a line, reorder text or
hide part of itself (issue 11 §6, docs/escalation.md "What approvers read").

Hidden characters (`hidden`):
- C0 controls, DEL and C1 controls (category Cc), e.g. ESC `\\x1b`, CR, CSI `\\x9b`;
- format characters (Cf): bidirectional controls U+202A–202E, U+2066–2069,
  U+200E/F, U+061C; zero-width U+200B–200D, U+2060–2064, U+FEFF; soft hyphen;
  tag characters U+E0001–E007F; ...;
- line and paragraph separators U+2028/2029 (Zl, Zp), and every space other
  than U+0020 (Zs: no-break, en, em, ideographic ... spaces look like one);
- surrogates, private-use and unassigned code points (Cs, Co, Cn);
- invisible marks and fillers outside those categories: variation selectors
  (U+FE00–FE0F, U+E0100–E01EF, U+180B–180D, U+180F), the combining grapheme
  joiner U+034F, Hangul fillers U+115F, U+1160, U+3164, U+FFA0, Khmer
  U+17B4/17B5, braille blank U+2800.

Look-alike characters (`lookalikes`): what holds no hidden character yet reads as another value:
- in text that is not in Unicode normalization form C, the marks (an `e` and U+0301 read as
  U+00E9), Hangul conjoining jamo (read as the syllable) and the characters NFC replaces
  (U+212A KELVIN SIGN reads as `K`): canonically equivalent text is the same text to a reader;
- in a word (a run of letters and marks) that mixes Latin, Greek, Cyrillic, Armenian or
  Cherokee letters, or compatibility letters that fold to ASCII (fullwidth `ｅ`, mathematical
  `𝐞`), its non-ASCII letters: `exаmple.com` with a Cyrillic `а` reads as `example.com`.
  A word written wholly in one script is shown unchanged (`Привет`, `Ελληνικά`, `日本語`).

A value holding any of them is shown whole in escaped form (`visible`):
`\\n \\r \\t`, `\\xNN`, `\\uNNNN`, `\\UNNNNNNNN`, with backslashes doubled so
the escaped form cannot be mistaken for the same text typed out; and it is
flagged (`FLAG`, `NOTICE`), the look-alike characters escaped with them. So is a value
that holds the flag itself, so no value can pose as another one's escaped form
(`needs_flag`). Any other value is shown unchanged: two different values never read
the same, short of whole words written in another script (`аре`, all Cyrillic).
JSON for people (`json_text`) uses JSON's own `\\uNNNN` escapes, so it stays
valid JSON with the same value; JSON for programs (`exact_json`) is ASCII-only.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

FLAG = "[!]"
NOTICE = "holds control or invisible characters, shown escaped"

_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
_INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164, 0xFFA0]
    + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0))
)
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def hidden(ch: str) -> bool:
    """True for one character a reader cannot see as itself (see the module docstring)."""
    if ch == " ":
        return False
    return ord(ch) in _INVISIBLE or unicodedata.category(ch) in _HIDDEN_CATEGORIES


def has_hidden(text: str) -> bool:
    return any(hidden(ch) for ch in text)


# Scripts whose letters look alike (a/а/α, e/е, o/о/ο, p/р/ρ, c/с, x/х, ...), by the first word of a
# letter's Unicode name; COMPAT: a compatibility letter that folds to an ASCII one (fullwidth, mathematical).
_LOOKALIKE_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "CHEROKEE"})
_JAMO = ((0x1100, 0x11FF), (0xA960, 0xA97F), (0xD7B0, 0xD7FF))


def _script(ch: str) -> str | None:
    if ch.isascii():
        return "LATIN"
    folded = unicodedata.normalize("NFKC", ch)
    if folded != ch and folded.isascii() and folded.isalnum():
        return "COMPAT"
    name = unicodedata.name(ch, "")
    first = name.split(" ", 1)[0]
    return first if first in _LOOKALIKE_SCRIPTS else None


def _replaced_by_nfc(ch: str) -> bool:
    code = ord(ch)
    return (unicodedata.category(ch)[0] == "M" or any(low <= code <= high for low, high in _JAMO)
            or unicodedata.normalize("NFC", ch) != ch)


def lookalikes(text: str) -> set[int]:
    """Positions in `text` of the look-alike characters (module docstring); empty for ASCII text."""
    if text.isascii():
        return set()
    found: set[int] = set()
    if not unicodedata.is_normalized("NFC", text):
        found.update(i for i, ch in enumerate(text) if _replaced_by_nfc(ch))
        if not found:  # not NFC, yet no character above: show every non-ASCII one
            found.update(i for i, ch in enumerate(text) if not ch.isascii())
    word: list[int] = []
    scripts: set[str] = set()
    for i, ch in enumerate(text):
        kind = unicodedata.category(ch)[0]
        if kind in "LM":
            word.append(i)
            script = _script(ch) if kind == "L" else None
            if script is not None:
                scripts.add(script)
            continue
        if len(scripts) > 1:
            found.update(j for j in word if not text[j].isascii())
        word, scripts = [], set()
    if len(scripts) > 1:
        found.update(j for j in word if not text[j].isascii())
    return found


def needs_flag(text: str) -> bool:
    """True when the text must be shown escaped and flagged: hidden or look-alike characters, or the flag itself."""
    return FLAG in text or has_hidden(text) or bool(lookalikes(text))


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def visible(text: Any) -> str:
    """The text unchanged when it has no hidden characters; else all of it escaped (backslashes doubled)."""
    text = "" if text is None else str(text)
    if not needs_flag(text):
        return text
    alike = lookalikes(text)
    return "".join("\\\\" if ch == "\\" else _escape(ch) if hidden(ch) or i in alike else ch
                   for i, ch in enumerate(text))


def cell(text: Any) -> str:
    """A table cell: `visible(text)`, prefixed with FLAG when it held hidden characters."""
    text = "" if text is None else str(text)
    return FLAG + visible(text) if needs_flag(text) else text


def value_needs_flag(value: Any) -> bool:
    """True when any string or object key inside a JSON value needs the flag (`needs_flag`)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if needs_flag(node):
                return True
        elif isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str) and needs_flag(key):
                    return True
                stack.append(item)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_safe(text: str) -> str:
    """JSON text (compact or indented) with every hidden character inside its strings as a JSON escape.

    Parses to the same value; other characters, readable non-ASCII text included, are left as they are."""
    # Outside strings JSON text is ASCII structure plus " " and "\n" of indentation, none of them hidden
    # (nor a letter, so a word never runs from one string into the next).
    alike = lookalikes(text)
    return "".join(_json_escape(ch) if (ch not in " \n" and hidden(ch)) or i in alike else ch
                   for i, ch in enumerate(text))


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """JSON for people: readable non-ASCII text, hidden characters as JSON escapes; same value when parsed."""
    return json_safe(json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False))


def exact_json(value: Any, **kwargs: Any) -> str:
    """JSON for programs and pipes (`--json`): ASCII only, so nothing in it acts on a terminal."""
    return json.dumps(value, ensure_ascii=True, **kwargs).replace("\x7f", "\\u007f")


def flagged(fields: dict[str, Any]) -> list[str]:
    """The names of the fields whose values (strings, lists, objects, keys too) hold hidden characters."""
    return [name for name, value in fields.items() if value_needs_flag(value)]
