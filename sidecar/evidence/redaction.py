"""Secrets are never written in clear: the one rule set for evidence records, their spans and previews.

Every value of every evidence record passes through `Redactor.record` before
it is sealed (so the OpenTelemetry spans, which are built from the records,
carry only redacted values), and the argument preview approvers see passes
through `Redactor.value`. The rules:

1. Secret keys. A mapping key is secret when its letters and digits,
   compatibility-normalized and case-folded (case, width and separators dropped: `API-Key`, `x_api_key` and
   `XApiKey` read `apikey`, `xapikey`), contain one of SECRET_KEY_PARTS or a
   configured extra key (`evidence.redact_keys`, the `redact_arguments`
   obligation; normalized the same way), or are exactly one of
   SECRET_KEY_NAMES. The value under a secret key, whatever its shape
   (string, number, list, object), becomes "[REDACTED]".
2. Secrets inside strings, in every string at any depth:
   - `<secret key>=<value>` and `<secret key>: <value>` (query strings,
     header lines, `"token": "..."` in JSON text, `password=...` in prose;
     a key is a whole token; a value in quotes never closed runs to the end
     of the text, or of the line for single quotes);
   - `<secret key> <value>` in prose when the value looks like a credential
     (6 or more characters, with a digit or a symbol: `api-key sk-123abc`,
     `password hunter2`, not `token limit`);
   - the credential after `Bearer` or `Basic` (HTTP authorization schemes);
   - the password in a URL's user information (`postgres://u:pw@host`);
   - PEM private key blocks, and JSON Web Tokens (`eyJ...` `.` `eyJ...` `.` ...,
     JWT-SVIDs among them) wherever they stand;
   - a string that holds a JSON object or array is read, and redacted by
     rule 1 too; it is rewritten (compact JSON) only when something in it was.
   - a string with percent-encoding (RFC 3986, section 2.1: `to%6Ben=...` in a
     query string) is judged decoded too, as a server reads it; when a rule
     finds a secret there, the decoded text, redacted, is what is kept.
3. Digests for replay. A decision record's `input` (the policy input, for
   `agent-sidecar policy replay`) follows the same rules, but each value a
   rule picks (the value under a secret key; a string in which a text rule
   found a secret, as a whole) is replaced by `digest()` of it, not by
   "[REDACTED]": equal values keep equal digests, so a replayed policy can
   still compare them for equality (docs/evidence.md, "Replayable input").
4. Paths. `record()` lists what it replaced as paths (`signals.api_key`,
   `arguments.items[2].password`, `intent`) in the record's `redacted` field.
   Top-level field names of a record are the sidecar's own schema (e.g. an
   invocation's `credential_id`), so rule 1 is not applied to them; their
   values are redacted like everything else. Likewise the code of a reason
   in a record's `reasons` that is one of the sidecar's own (reasons.py
   SIDECAR_CODES, e.g. `credential_unavailable`) is not read as a key: its
   text is redacted, the code kept. A code policy wrote is not exempt.

What no rule recognizes (a bare secret in free text with no key, scheme or
URL around it) cannot be redacted: arguments are therefore recorded as a
digest unless config or policy asks for them in clear (docs/evidence.md).
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any, Callable, Iterable
from urllib.parse import unquote

import orjson

from sidecar.canonical import NotCanonicalizable, canonical_json, sha256_digest
from sidecar.jsonvalues import spelled
from sidecar.reasons import SIDECAR_CODES, Reason, parse

REDACTED = "[REDACTED]"
# Record fields whose picked values become digests rather than REDACTED (rule 3).
DIGESTED_FIELDS = ("input",)

# Substrings of a normalized key (lower-case letters and digits only) that make it secret.
SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
    "credential",
    "cookie",
    "session",
    "bearer",
)
# Whole normalized keys that are secret (too short to match as substrings: `author` is not `auth`).
SECRET_KEY_NAMES = ("auth", "pass", "pwd", "pw", "pin", "otp", "jwt")

# Longest string read as JSON for rule 2 (longer ones get the text rules only).
MAX_JSON_STRING = 1 << 20

_KEY_SPACE_VALUE = re.compile(
    # the value is only looked at (not consumed): it may be the next key ("use api-key sk-1...")
    r"""(?<![A-Za-z0-9_.\-])(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*+)[ \t]++"""
    r"""(?=(?P<value>(?=[^\s"'&;,)}\]]*[0-9\-_./+!@#$%^*~])[^\s"'&;,)}\]]{6,}))"""
)
_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_NOT_ALNUM_BYTES = bytes(range(256)).translate(None, b"0123456789abcdefghijklmnopqrstuvwxyz")  # all but these
_LETTER_ESCAPE = re.compile(rb"\\[bfnrtu]")  # a JSON escape that writes a letter: `\n`, `\u0041`
_PERCENT_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")  # percent-encoding (RFC 3986, section 2.1): `%6B` is `k`
_IN_TOKEN = re.compile(r"[_.\-]+")  # what a key token holds besides letters and digits
# The text rules run on caller text of up to a megabyte, on the event loop: each one takes time
# linear in the text. A match starts only where the token it needs starts (a lookbehind), and its
# runs never give back characters (possessive `*+`, `++`), so no attempt rescans a run another made.
_PEM_PRIVATE = re.compile(  # (the label's run ends at a "-": giving back within it stays linear)
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)
_JWT_START = re.compile(r"(?<![A-Za-z0-9_])eyJ")  # where `\beyJ` would start a JSON Web Token
_JWT_AT = re.compile(r"eyJ[A-Za-z0-9_\-]{4,}+\.eyJ[A-Za-z0-9_\-]{4,}+\.[A-Za-z0-9_\-]*+")
_BASE64URL_RUN = re.compile(r"[A-Za-z0-9_\-]*+")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer\s++)([A-Za-z0-9\-._~+/]++=*+)|\b(basic\s++)([A-Za-z0-9+/]{8,}+=*+)")
_URL_USERINFO = re.compile(r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*+://[^\s:/@?#]*+):([^\s/@?#]++)@")
# `<key>=` or `<key>:` where a token starts; the value is read only after a secret key (_VALUE).
_ASSIGNMENT = re.compile(r"""(?<![A-Za-z0-9_.\-])(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-]*+)["']?[ \t]*+[:=][ \t]*+""")
# A value: "quoted" (to the end of the text when never closed), 'quoted' (to the end of the
# line when never closed), or bare up to a delimiter.
_VALUE = re.compile(r""""(?P<dq>(?:[^"\\]|\\.)*+)(?:"|\Z)|'(?P<sq>[^'\n]*+)(?:'|(?=\n)|\Z)|(?P<bare>[^\s"'&;,)}\]]++)""", re.S)


MAX_PERCENT_DECODES = 3  # layers of percent-encoding taken off one string (rule 2)
_PLAIN_MAX_CHARS = 1024  # longest string remembered as needing no rule
_PLAIN_MAX_STRINGS = 8192  # how many are remembered
_MAX_CLONES = 64  # rule sets with extra keys remembered (with_keys)


def normalize_key(key: str) -> str:
    """Compatibility-normalized (NFKC), case-folded, letters and digits only: `X-Api_Key`, `ＡＰＩ＿ＫＥＹ` → `apikey`."""
    if not key.isascii():
        key = unicodedata.normalize("NFKC", key)
    return _NON_ALNUM.sub("", key.casefold())


class Redactor:
    """The rule set, with the extra secret keys of a deployment (`evidence.redact_keys`)."""

    def __init__(self, extra_keys: Iterable[str] = ()):
        self._set_parts((*SECRET_KEY_PARTS, *_normalized(extra_keys)))

    def _set_parts(self, parts: Iterable[str]) -> None:
        self._parts = tuple(dict.fromkeys(parts))
        # any of these in a string's squashed letters and digits: a text rule might match
        trigger = _any_of((*self._parts, *SECRET_KEY_NAMES, "basic"))
        self._trigger = re.compile(trigger)
        self._trigger_bytes = re.compile(trigger.encode())
        self._keys: dict[str, bool] = {}  # is_secret_key, remembered (keys repeat across records)
        # Strings no text rule can match, remembered: most values repeat across records
        # (SPIFFE IDs, tool names, catalog descriptions, reasons). Cleared when full.
        self._plain: set[str] = set()
        self._clones: dict[tuple[str, ...], Redactor] = {}  # with_keys, remembered

    def with_keys(self, extra_keys: Iterable[str]) -> "Redactor":
        """This rule set plus more secret keys (a decision's `redact_arguments` obligation).

        The same extra keys get the same rule set back, caches warm: a tool's obligation
        repeats on every call (a fresh rule set cost six times a warm one per record)."""
        extra = tuple(sorted(set(_normalized(extra_keys))))
        if not extra:
            return self
        clone = self._clones.get(extra)
        if clone is None:
            if len(self._clones) >= _MAX_CLONES:
                self._clones.clear()
            clone = Redactor()
            clone._set_parts((*self._parts, *extra))
            self._clones[extra] = clone
        return clone

    def is_secret_key(self, key: Any) -> bool:
        if not isinstance(key, str):
            return False
        known = self._keys.get(key)
        if known is None:
            normal = normalize_key(key)
            known = bool(normal) and (normal in SECRET_KEY_NAMES or any(part in normal for part in self._parts))
            if len(self._keys) < 4096 and len(key) <= 256:
                self._keys[key] = known
        return known

    def _may_hold_secret(self, text: str) -> bool:
        """Cheap pre-check: could any text rule match? (Every rule needs one of these in the text.)

        In ASCII text that is not JSON, a rule's key is one token (`[A-Za-z0-9_.-]`, see
        _ASSIGNMENT), so letters are joined within tokens only: `roadmap incident` holds no
        `pin`. JSON text (keys may hold spaces) and other text are squashed whole."""
        if ("@" in text and "://" in text) or "PRIVATE KEY" in text or "eyJ" in text:
            return True
        if "%" in text:
            decoded = text
            for _ in range(MAX_PERCENT_DECODES):  # as far as _string decodes
                decoded = unquote(decoded)
            if decoded != text and self._may_hold_secret(decoded):
                return True
        looks_json = text.lstrip()[:1] in ("{", "[")
        if looks_json and "\\" in text:  # escapes (`\u0074oken`, `to\nken`) hide a key's letters: read it
            return True
        if text.isascii() and not looks_json:
            return self._trigger.search(_IN_TOKEN.sub("", text.lower())) is not None
        return self._trigger.search(normalize_key(text)) is not None

    def _nothing_to_redact(self, value: Any) -> bool:
        """Cheap pre-check of a whole value: True when no rule can pick anything in it.

        Its JSON text (orjson) holds every key and string verbatim, bar the escapes of `"` and
        `\\`, when it is ASCII and has no escape that writes a letter (`\\n`, `\\u0041`). Then,
        lower-cased with all but letters and digits dropped, it holds each key's normalized form
        and each string's squashed letters as a run: no trigger in it, no rule can match
        (`_may_hold_secret` and `is_secret_key` need one). Anything else (non-ASCII text, a value
        orjson does not write) answers False, and the walk decides.
        """
        try:
            text = orjson.dumps(value)
        except TypeError:  # orjson.JSONEncodeError: not JSON (a non-string key, another type)
            return False
        if not text.isascii() or _LETTER_ESCAPE.search(text) is not None or _PERCENT_ESCAPE.search(text) is not None:
            return False
        if (b"@" in text and b"://" in text) or b"PRIVATE KEY" in text or b"eyJ" in text:
            return False
        return self._trigger_bytes.search(text.lower().translate(None, _NOT_ALNUM_BYTES)) is None

    # -- values ---------------------------------------------------------------

    def value(self, value: Any, path: str = "") -> tuple[Any, list[str]]:
        """A redacted copy of `value` (the value itself when nothing changed) and the redacted paths."""
        if self._nothing_to_redact(value):
            return value, []
        found: list[str] = []
        return self._walk(value, path, found, 0), found

    def record(self, fields: dict) -> dict:
        """Every field of one evidence record, redacted; adds `redacted` (paths) when anything was.

        Fields named in DIGESTED_FIELDS get digests instead of REDACTED (rule 3)."""
        if self._nothing_to_redact(fields):  # most records: one C-speed scan instead of the walk
            return dict(fields)
        found: list[str] = []
        out = {
            key: self._reasons(value, found) if key == "reasons" and type(value) is list
            else self._walk(value, key, found, 1, digest if key in DIGESTED_FIELDS else None)
            for key, value in fields.items()
        }
        if found:
            out["redacted"] = sorted(set(found) | set(fields.get("redacted") or ()))
        return out

    def _reasons(self, reasons: list, found: list[str]) -> list:
        """A record's `reasons`: the sidecar's own code of each kept, its text and anything else redacted."""
        out = []
        for i, reason in enumerate(reasons):
            parsed = parse(reason) if type(reason) is str else None
            if parsed is not None and parsed.code in SIDECAR_CODES:
                text = self._string(parsed.text, ("reasons", i, None), found, 1)
                out.append(reason if text is parsed.text else str(Reason(parsed.code, text)))
            else:
                out.append(self._walk(reason, ("reasons", i, None), found, 1))
        return out

    def text(self, text: str) -> str:
        """One string with rule 2 applied."""
        return self._string(text, "", [], 0)

    def _walk(
        self, node: Any, where: Any, found: list[str], depth: int, whole: Callable[[Any], str] | None = None
    ) -> Any:
        """`whole`: what a picked value becomes in full (rule 3); None = rule 1 and 2's REDACTED.

        `where` is the node's path, spelled out (`_path`) only for what is redacted: most
        records have nothing to redact, and building every path was most of the walk."""
        if isinstance(node, str):
            cleaned = self._string(node, where, found, depth)
            return whole(node) if whole is not None and cleaned is not node else cleaned
        if isinstance(node, dict):
            out = {}
            changed = False
            known, plain = self._keys, self._plain
            for key, child in node.items():
                secret = known.get(key)
                if secret is None:
                    secret = self.is_secret_key(key)
                if secret:
                    out[key] = whole(child) if whole is not None else REDACTED
                    found.append(_path((where, key)))
                    changed = True
                elif type(child) in _SCALARS or (type(child) is str and child in plain):
                    out[key] = child
                else:
                    out[key] = new = self._walk(child, (where, key), found, depth + 1, whole)
                    changed = changed or new is not child
            return out if changed else node
        if isinstance(node, (list, tuple)):
            items = [
                child if type(child) in _SCALARS else self._walk(child, (where, i, None), found, depth + 1, whole)
                for i, child in enumerate(node)
            ]
            if any(new is not old for new, old in zip(items, node)):
                return items
            return node
        return node

    def _string(self, text: str, where: Any, found: list[str], depth: int, decodes: int = 0) -> str:
        """Rule 2 on one string; `decodes` is how many times percent-encoding was taken off it already."""
        if not text or text in self._plain:
            return text
        if not self._may_hold_secret(text):
            if len(text) <= _PLAIN_MAX_CHARS:
                if len(self._plain) >= _PLAIN_MAX_STRINGS:
                    self._plain.clear()
                self._plain.add(text)
            return text
        out = text
        head = text.lstrip()[:1]
        if head in ("{", "[") and len(text) <= MAX_JSON_STRING and depth < 64:
            try:
                parsed = json.loads(text)
            except (ValueError, RecursionError):
                parsed = None
            if isinstance(parsed, (dict, list)):
                inner: list[str] = []
                cleaned = self._walk(parsed, "", inner, depth + 1)
                if inner:
                    out = json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
        out = _PEM_PRIVATE.sub(REDACTED, out)
        out = _replaced(out, _jwt_spans(out))
        out = _AUTH_SCHEME.sub(_scheme_credential, out)
        out = _URL_USERINFO.sub(lambda m: f"{m.group(1)}:{REDACTED}@", out)
        out = self._assignments(out)
        out = self._key_space_value(out)
        if "%" in out and decodes < MAX_PERCENT_DECODES:
            decoded = unquote(out)
            if decoded != out:  # a reader decodes `to%6Ben=...` to `token=...`: judge what it reads
                inner = []
                cleaned = self._string(decoded, "", inner, depth, decodes + 1)
                if inner:
                    out = cleaned
        if out != text:
            found.append(_path(where) or "(text)")
            return out
        return text

    def _key_space_value(self, text: str) -> str:
        return _replaced(text, [
            match.span("value")
            for match in _KEY_SPACE_VALUE.finditer(text)
            if self.is_secret_key(match.group("key")) and not match.group("value").startswith(REDACTED)
        ])

    def _assignments(self, text: str) -> str:
        """`<secret key>=<value>` and `<secret key>: <value>`: the value becomes REDACTED (quotes kept).

        Keys are looked for inside the values of other keys too ("note: password=..."); the value
        of a secret key is redacted whole, so the search goes on after it."""
        spans = []
        position = 0
        while (match := _ASSIGNMENT.search(text, position)) is not None:
            position = match.end()
            if not self.is_secret_key(match.group("key")):
                continue
            value = _VALUE.match(text, position)
            if value is None:
                continue
            kind = value.lastgroup
            start, end = value.span(kind)
            if not text.startswith(REDACTED, start):
                spans.append((start, end))
            position = max(position, value.end())
        return _replaced(text, spans)


def _jwt_spans(text: str) -> list[tuple[int, int]]:
    """Where JSON Web Tokens (`eyJ….eyJ….…`, JWT-SVIDs among them) stand in `text`.

    A token run that does not start one is skipped whole: every `eyJ` later in the same run
    reaches the same end and the same next character, so it cannot start one either."""
    spans = []
    position = 0
    while (start := _JWT_START.search(text, position)) is not None:
        token = _JWT_AT.match(text, start.start())
        if token is not None:
            spans.append(token.span())
            position = token.end()
        else:
            position = max(start.end(), _BASE64URL_RUN.match(text, start.start()).end())
    return spans


def _any_of(words: Iterable[str]) -> str:
    """A regex that finds any of `words` (letters and digits): a word holding another is left out (the
    shorter one is found anyway), and words are grouped by first letter, which `re` scans about
    twice as fast as a flat alternation."""
    unique = set(words)
    kept = sorted(w for w in unique if not any(other != w and other in w for other in unique))
    groups: dict[str, list[str]] = {}
    for word in kept:
        groups.setdefault(word[0], []).append(word[1:])
    return "|".join(first + (rests[0] if len(rests) == 1 else f"(?:{'|'.join(rests)})") for first, rests in groups.items())


def _replaced(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each span, (start, end) offsets into it, replaced by REDACTED; overlapping spans count as one."""
    if not spans:
        return text
    pieces = []
    kept_from = 0  # text before this offset is written (or replaced) already
    for start, end in sorted(spans):
        if start >= kept_from:
            pieces += (text[kept_from:start], REDACTED)
        elif end <= kept_from:
            continue  # inside the span before
        kept_from = max(kept_from, end)
    pieces.append(text[kept_from:])
    return "".join(pieces)


# Values with nothing to redact in them: the walk copies them as they are.
_SCALARS = frozenset((int, float, bool, type(None)))


def _path(where: Any) -> str:
    """A walk position as text: (parent, key) is `parent.key`, (parent, i, None) is `parent[i]`."""
    return spelled(where, _dotted)


def _dotted(parent: str, key: Any) -> str:
    return f"{parent}.{key}" if parent else str(key)


def digest(value: Any) -> str:
    """A stable stand-in for a value (rule 3): "sha256:<hex>" of its canonical JSON (of its repr if it has none).

    Unsalted, so equal values give equal digests across records and sidecars; a
    short secret (a PIN) can be found again by trying every candidate.
    """
    try:
        return sha256_digest(canonical_json(value))
    except NotCanonicalizable:
        return sha256_digest(repr(value).encode("utf-8", "backslashreplace"))


def _scheme_credential(match: re.Match) -> str:
    scheme = match.group(1) or match.group(3)
    return f"{scheme}{REDACTED}"


def _normalized(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(n for n in (normalize_key(k) for k in keys if isinstance(k, str)) if n)


def obligation_keys(obligations: Any) -> list[str]:
    """The extra secret keys a decision's `redact_arguments` obligation names."""
    extra = (obligations or {}).get("redact_arguments") if isinstance(obligations, dict) else None
    return [k for k in extra if isinstance(k, str)] if isinstance(extra, list) else []
