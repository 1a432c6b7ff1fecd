"""Nothing the sidecar sends out crosses a network in clear: every setting whose URL carries data
(a credential, an escalation notice, a call's input to an external OPA) refuses plain http:// to a host that is not loopback, by one rule,
unless its opt-in says the network encrypts the hop (a service mesh's mTLS).

Every surface is tried with every spelling of a host: what a reader takes for loopback and is not
(`127.0.0.1.evil.example`, `127.0.0.1@evil.example`), and loopback written every way it can be.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from sidecar.config import ConfigError, load_config

DEV = {"identity.sources": ["dev"]}  # the check holds in dev mode too

# (url, the host it sends to in clear; None where nothing goes in clear)
SPELLINGS = [
    ("http://hooks.example.org", "hooks.example.org"),
    ("HTTP://Hooks.Example.ORG:80", "hooks.example.org"),       # the scheme in capitals is http too
    ("http://relay:8080", "relay"),                             # a Service name
    ("http://10.0.0.5:8080", "10.0.0.5"),                       # an address off the pod
    ("http://[2001:db8::1]:8080", "2001:db8::1"),
    ("http://0.0.0.0:8080", "0.0.0.0"),
    ("http://127.0.0.1.evil.example", "127.0.0.1.evil.example"),  # a name that starts like loopback
    ("http://localhost.evil.example:8080", "localhost.evil.example"),
    ("http://127.0.0.1@evil.example", "evil.example"),          # loopback as userinfo: the host is after @
    ("http://127.0.0.1:80@evil.example:8080", "evil.example"),
    ("http://bot:s3cret@hooks.example.org", "hooks.example.org"),
    ("http://127.0.0.1:8080", None),
    ("http://127.9.8.7", None),                                 # all of 127.0.0.0/8
    ("http://localhost:8080", None),
    ("HTTP://LOCALHOST", None),
    ("http://[::1]:8080", None),
    ("http://evil.example@127.0.0.1:8080", None),               # userinfo that names another host: still loopback
    ("https://hooks.example.org", None),
    ("HTTPS://10.0.0.5:8443", None),
]


class Surface:
    """A setting that sends data to a URL: the settings that put `url` there, the key a refusal
    names, what it says would go in clear, and the settings that opt in."""

    def __init__(self, name: str, settings: Callable[[str, bool], dict[str, Any]], key: str, what: str,
                 allowed_by: str):
        self.name, self.settings, self.key, self.what, self.allowed_by = name, settings, key, what, allowed_by

    def __repr__(self) -> str:
        return self.name


def _credential_surface(section: str, name: str, kind: dict[str, str]) -> Surface:
    def settings(url: str, opt_in: bool) -> dict[str, Any]:
        return {**DEV, section: {name: {"url": url, "credential": {**kind, "allow_plaintext": opt_in}}}}

    key = f"{section}.{name}.credential"
    return Surface(f"{section} {kind['kind']}", settings, key, f"the {kind['kind']} credential", f"{key}.allow_plaintext")


JWT = {"kind": "jwt_svid", "audience": "spiffe://example.org/docs"}
SECRET = {"kind": "secret_file", "file": "/var/run/secrets/token"}
SURFACES = [
    Surface("policy.opa.url",
            lambda url, opt_in: {**DEV, "policy.opa": {"url": url, "allow_plaintext": opt_in}},
            "policy.opa.url", "every call's input (its arguments in full) and OPA's answer", "policy.opa.allow_plaintext"),
    Surface("escalation.webhook_url",
            lambda url, opt_in: {**DEV, "escalation.webhook_url": url, "escalation.webhook_allow_plaintext": opt_in},
            "escalation.webhook_url", "notices", "escalation.webhook_allow_plaintext"),
    *(_credential_surface(section, name, kind) for section, name in (("mcp.upstreams", "docs"), ("invoke.tools", "lookup"))
      for kind in (JWT, SECRET)),
]


@pytest.mark.parametrize("surface", SURFACES, ids=repr)
@pytest.mark.parametrize("url, host", SPELLINGS)
def test_nothing_goes_in_clear_off_loopback(surface: Surface, url: str, host: str | None):
    if host is None:
        load_config(None, surface.settings(url, False))
    else:
        with pytest.raises(ConfigError) as info:
            load_config(None, surface.settings(url, False))
        message = str(info.value)
        assert message.startswith(f"{surface.key}: {surface.what} would go in clear over http:// to {host} ("), message
        assert f"{surface.allowed_by}: true where the network encrypts the hop" in message, message
        assert "s3cret" not in message  # userinfo is never shown
    load_config(None, surface.settings(url, True))  # the opt-in: a service mesh's mTLS encrypts the hop


def test_the_opt_ins_default_off():
    config = load_config(None, runs_sidecar=False)
    assert config.escalation.webhook_allow_plaintext is False and config.policy.opa.allow_plaintext is False
