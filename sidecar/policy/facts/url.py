"""Facts about a URL, from yarl (the parser aiohttp, the sidecar's HTTP client, uses).

    {
      "format": "url",
      "parsed": true,            false when yarl refuses the text, or it is not
                                 an absolute URL with a host
      "error": null,
      "scheme": "https",         lower case
      "host": "docs.example.org",  lower case; an international name in its
                                 IDNA (xn--) form, the name DNS is asked for
      "port": 443,               explicit, else the scheme's default (null if none)
      "userinfo": false,         user or password present (https://a@host/)
      "ambiguous": false         the text holds what URL parsers read
                                 differently: a backslash, whitespace or a
                                 control character, a non-ASCII character,
                                 or a "%" in the authority
    }

`ambiguous` matters because the tool that receives the URL may parse it with
another library: yarl drops a tab inside a host (`exam<TAB>ple.org` is
`example.org`), WHATWG parsers read `\\` as `/`. Policy allows only an
unambiguous URL, so every parser sees the host the facts name.
"""

from __future__ import annotations

import re
from typing import Any

import yarl

FORMAT = "url"
_AMBIGUOUS = re.compile(r"[\x00-\x20\x7f-\U0010ffff\\]")


def url_facts(text: str) -> dict[str, Any]:
    """Facts about `text`; never raises."""
    try:
        url = yarl.URL(text)
        host = url.raw_host
        scheme = url.scheme
        port = url.port
    except (ValueError, TypeError, UnicodeError) as exc:
        return unparsed(str(exc) or type(exc).__name__)
    if not url.is_absolute() or not scheme or not host:
        return unparsed("not an absolute URL with a scheme and a host")
    authority = text.split("://", 1)[1] if "://" in text else text
    authority = re.split(r"[/?#]", authority, maxsplit=1)[0]
    return {
        "format": FORMAT,
        "parsed": True,
        "error": None,
        "scheme": scheme.lower(),
        "host": host.lower(),
        "port": port,
        "userinfo": url.raw_user is not None or url.raw_password is not None,
        "ambiguous": bool(_AMBIGUOUS.search(text)) or "%" in authority,
    }


def unparsed(error: str) -> dict[str, Any]:
    """The facts of text that was not parsed: `error` says why."""
    return {"format": FORMAT, "parsed": False, "error": error}
