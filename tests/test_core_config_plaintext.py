"""Nothing the sidecar sends out crosses a network in clear: every setting that carries data (a tool's
calls, arguments, answers and credential alike; an escalation notice; a call's input to an external OPA;
the evidence spans to a collector; the console's approvals; the PostgreSQL stores) refuses plain http://
(plaintext gRPC, PostgreSQL without verified TLS) to a host that is not loopback, by one rule, unless its
opt-in says the network encrypts the hop (a service mesh's mTLS).

Every surface is tried with every spelling of a host: what a reader takes for loopback and is not
(`127.0.0.1.evil.example`, `127.0.0.1@evil.example`, `localhost.`, an IPv4-mapped address), and
loopback written every way it can be.
"""

from __future__ import annotations

import re
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
    ("http://a@evil.example@127.0.0.1", None),                  # two @: every client reads the host after the last
    ("http://127.0.0.1;@evil.example", "evil.example"),
    ("http://[::1]@evil.example:8080", "evil.example"),         # IPv6 loopback as userinfo
    ("http://localhost.:8080", "localhost."),                   # a name resolved by DNS, not the loopback name
    ("http://LOCALHOST.evil.example", "localhost.evil.example"),
    ("http://[::ffff:127.0.0.1]:8080", "::ffff:127.0.0.1"),     # IPv4-mapped: not counted as loopback
    ("http://[::]:8080", "::"),                                 # the unspecified address
    ("http://2130706433", "2130706433"),                        # 127.0.0.1 as a number: a name to us, refused
    ("http://127.1:8080", "127.1"),                             # short form: refused, never guessed
    ("http://0x7f.0.0.1", "0x7f.0.0.1"),
    ("http://127.0.0.1%2e.evil.example", "127.0.0.1%2e.evil.example"),
    ("http://127.0.0.1:8080", None),
    ("http://127.9.8.7", None),                                 # all of 127.0.0.0/8
    ("http://localhost:8080", None),
    ("HTTP://LOCALHOST", None),
    ("http://[::1]:8080", None),
    ("http://[0:0:0:0:0:0:0:1]:8080", None),                    # ::1 written out
    ("http://[::1%25lo]:8080", None),                           # with a zone
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


def _tool_surface(section: str, name: str, kind: dict[str, str], path: str = "") -> Surface:
    """An MCP upstream or an HTTP tool, with or without a credential: one opt-in per upstream or tool
    covers its arguments, its answers and its credential alike."""
    def settings(url: str, opt_in: bool) -> dict[str, Any]:
        return {**DEV, section: {name: {"url": url + path, "credential": kind, "allow_plaintext": opt_in}}}

    what = "its calls' arguments and answers" + (f", and the {kind['kind']} credential," if kind else "")
    return Surface(f"{section} {kind.get('kind', 'no credential')}", settings, f"{section}.{name}.url", what,
                   f"{section}.{name}.allow_plaintext")


SPANS = ("the evidence spans (who called which tool, outcomes, reasons, approvers) and the exporter's headers "
         "(OTEL_EXPORTER_OTLP_HEADERS, often a collector's API key)")
JWT = {"kind": "jwt_svid", "audience": "spiffe://example.org/docs"}
SECRET = {"kind": "secret_file", "file": "/var/run/secrets/token"}
SURFACES = [
    Surface("policy.opa.url",
            lambda url, opt_in: {**DEV, "policy.opa": {"url": url, "allow_plaintext": opt_in}},
            "policy.opa.url", "every call's input (its arguments in full) and OPA's answer", "policy.opa.allow_plaintext"),
    Surface("escalation.webhook_url",
            lambda url, opt_in: {**DEV, "escalation.webhook_url": url, "escalation.webhook_allow_plaintext": opt_in},
            "escalation.webhook_url", "notices", "escalation.webhook_allow_plaintext"),
    Surface("telemetry.endpoint",
            lambda url, opt_in: {**DEV, "telemetry.endpoint": url, "telemetry.allow_plaintext": opt_in},
            "telemetry.endpoint", SPANS, "telemetry.allow_plaintext"),
    *(_tool_surface("mcp.upstreams", "docs", kind, "/mcp") for kind in ({}, JWT, SECRET)),
    # a URL template: the host checked is the template's own (arguments only ever fill path and query)
    *(_tool_surface("invoke.tools", "lookup", kind, "/items/{item}?q={query}") for kind in ({}, JWT, SECRET)),
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


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
@pytest.mark.parametrize("url, host", SPELLINGS)
def test_spans_go_in_clear_off_loopback_from_the_environment_neither(protocol: str, variable: str, url: str,
                                                                     host: str | None):
    """telemetry.endpoint "" leaves the endpoint to the OTEL_* variables, checked where the exporter is built."""
    from sidecar.evidence.spans import exporter_from_env

    env = {variable: url}
    if host is None:
        exporter_from_env(protocol=protocol, environ=env).shutdown()
    else:
        with pytest.raises(ConfigError) as info:
            exporter_from_env(protocol=protocol, environ=env)
        message = str(info.value)
        assert message.startswith(f"{variable}: {SPANS} would go in clear over http:// to {host} ("), message
        assert "telemetry.allow_plaintext: true where the network encrypts the hop" in message and "s3cret" not in message
    exporter_from_env(protocol=protocol, allow_plaintext=True, environ=env).shutdown()  # the opt-in


@pytest.mark.parametrize("endpoint, env, refused_as", [
    ("collector.example:4317", {}, None),  # no scheme: TLS, the gRPC exporter's default
    ("collector.example:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "true"},
     "telemetry.endpoint (with OTEL_EXPORTER_OTLP_INSECURE=true)"),
    ("collector.example:4317", {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "TRUE", "OTEL_EXPORTER_OTLP_INSECURE": "false"},
     "telemetry.endpoint (with OTEL_EXPORTER_OTLP_TRACES_INSECURE=true)"),
    ("collector.example:4317", {"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
     None),  # the traces variable wins, as in the exporter
    ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector.example:4317", "OTEL_EXPORTER_OTLP_INSECURE": "true"},
     "OTEL_EXPORTER_OTLP_ENDPOINT (with OTEL_EXPORTER_OTLP_INSECURE=true)"),
    ("localhost:4317", {"OTEL_EXPORTER_OTLP_INSECURE": "true"}, None),  # in clear, on loopback
    ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector.example:4317",
          "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317"}, None),  # the traces variable wins
    ("https://collector.example:4317", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.example:4317"}, None),
    ("", {}, None),  # the default: localhost
])
def test_a_grpc_endpoint_without_a_scheme_is_in_clear_only_when_insecure_says_so(endpoint, env, refused_as):
    from sidecar.evidence.spans import exporter_from_env

    if refused_as is None:
        exporter_from_env(endpoint=endpoint, environ=env).shutdown()
        return
    with pytest.raises(ConfigError, match=rf"^{re.escape(refused_as)}: the evidence spans .* to collector\.example \("):
        exporter_from_env(endpoint=endpoint, environ=env)
    exporter_from_env(endpoint=endpoint, allow_plaintext=True, environ=env).shutdown()


def test_the_opt_ins_default_off():
    config = load_config(None, {**DEV, "mcp.upstreams": {"docs": {"url": "https://docs.example/mcp"}},
                                "invoke.tools": {"lookup": {"url": "https://lookup.example/items"}}})
    assert config.escalation.webhook_allow_plaintext is False and config.policy.opa.allow_plaintext is False
    assert config.telemetry.allow_plaintext is False
    assert config.console.sidecar_allow_plaintext is False
    assert config.escalation.dsn_allow_plaintext is False and config.usage.dsn_allow_plaintext is False
    assert config.mcp.upstreams["docs"].allow_plaintext is False and config.invoke.tools["lookup"].allow_plaintext is False


@pytest.mark.parametrize("section", ["mcp.upstreams", "invoke.tools"])
def test_the_credential_has_no_opt_in_of_its_own(section: str):
    """The upstream's or tool's one opt-in covers its credential: a second key could only disagree with it."""
    with pytest.raises(ConfigError, match=rf"^{section}\.docs\.credential\.allow_plaintext: unknown key"):
        load_config(None, {**DEV, section: {"docs": {"url": "https://docs.example/mcp",
                                                     "credential": {**SECRET, "allow_plaintext": True}}}})


def test_a_stdio_upstream_has_nothing_to_send_in_clear():
    with pytest.raises(ConfigError, match=r"^mcp\.upstreams\.fs\.allow_plaintext: only for a Streamable HTTP upstream"):
        load_config(None, {**DEV, "mcp.upstreams": {"fs": {"command": ["fs-server"], "allow_plaintext": True}}})
    load_config(None, {**DEV, "mcp.upstreams": {"fs": {"command": ["fs-server"]}}})


def test_docs_mcp_quotes_the_refusal_as_the_sidecar_writes_it():
    from tests.conftest import REPO

    text = (REPO / "docs" / "mcp.md").read_text()
    quoted = text.split("credential (the CLI exits 2):\n\n", 1)[1].split("\n\n", 1)[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, {**DEV, "mcp.upstreams": {"docs": {"url": "http://docs-mcp:8000/mcp"}}})
    assert " ".join(quoted.split()) == f"agent-sidecar: {info.value}"


# console.sidecar is a gRPC target (host:port, unix:/path), and the console speaks no TLS: only the
# pod (loopback, a unix socket) is out of reach of the path.
CONSOLE_TARGETS = [
    ("agent-sidecars.agents.svc:50051", False),
    ("10.0.0.5:50051", False),
    ("0.0.0.0:50051", False),
    ("[::]:50051", False),
    ("[::ffff:127.0.0.1]:50051", False),
    ("127.0.0.1.evil.example:50051", False),
    ("localhost.:50051", False),
    ("dns:///agent-sidecars.agents.svc:50051", False),   # gRPC's own target syntax, resolved by DNS
    ("ipv4:127.0.0.1:50051", False),                     # loopback, but not a form we read: refused, never guessed
    ("127.0.0.1:50051", True),
    ("127.3.2.1:50051", True),
    ("localhost:50051", True),
    ("[::1]:50051", True),
    ("unix:/run/agent-sidecar/sidecar.sock", True),
    ("unix:///run/agent-sidecar/sidecar.sock", True),
]
CONSOLE = {"identity.sources": ["workload_api"], "listen.unix": "/tmp/x.sock", "escalation.approvers": ["email:*@example.org"],
           "console.trusted_header": "X-Email", "console.token_file": "/var/run/secrets/console/jwt"}


@pytest.mark.parametrize("dev", [False, True], ids=["outside dev mode", "dev mode"])
@pytest.mark.parametrize("target, in_the_pod", CONSOLE_TARGETS)
def test_the_console_reaches_its_sidecar_in_clear_only_inside_the_pod(target: str, in_the_pod: bool, dev: bool):
    base = {**DEV, "console.dev_approver": "email:dev@example.org"} if dev else CONSOLE
    config = load_config(None, {**base, "console.sidecar": target})
    if in_the_pod:
        config.validate_console()
    else:
        with pytest.raises(ConfigError) as info:
            config.validate_console()
        assert str(info.value).startswith(f"console.sidecar: the console's JWT-SVID, the approver it names and every "
                                          f"approval would go in clear over plaintext gRPC to {target!r} ("), info.value
        assert "console.sidecar_allow_plaintext: true where the network encrypts the hop" in str(info.value)
    load_config(None, {**base, "console.sidecar": target, "console.sidecar_allow_plaintext": True}).validate_console()


@pytest.mark.parametrize("target", ["127.0.0.1", "localhost", "127.0.0.1:99999"])
def test_a_console_sidecar_without_a_port_or_with_one_past_65535_is_refused_even_with_the_opt_in(target: str):
    """No port is gRPC's default 443 (a name for TLS the console lacks); 99999 is dialled as 34463: neither is the
    sidecar the operator meant, in clear or not."""
    for opt_in in (False, True):
        config = load_config(None, {**CONSOLE, "console.sidecar": target, "console.sidecar_allow_plaintext": opt_in})
        with pytest.raises(ConfigError, match=r"^console\.sidecar: must be host:port .* or unix:/path, not "):
            config.validate_console()


# PostgreSQL (escalation.dsn, usage.dsn): the connection libpq will make, from the string and the PG*
# variables it reads. Off the pod only with an sslmode that verifies the server (prefer and require give way
# to whoever on the path answers first). (dsn, environment, where it is refused as going; None: allowed)
POSTGRES = [
    ("host=db.example dbname=sidecar", {}, "db.example"),
    ("postgresql://sidecar:s3cret@10.0.0.5/sidecar", {}, "10.0.0.5"),
    ("host=db.example sslmode=require", {}, "db.example"),               # encrypted, but to anyone who answers
    ("host=db.example sslmode=disable", {}, "db.example"),
    ("host=db.example", {"PGSSLMODE": "require"}, "db.example"),
    ("", {"PGHOST": "agent-postgres.agents.svc"}, "agent-postgres.agents.svc"),
    ("", {"PGHOSTADDR": "10.0.0.5"}, "10.0.0.5"),
    ("host=127.0.0.1,db.example", {}, "db.example"),                     # any of several hosts
    ("host=127.0.0.1.evil.example", {}, "127.0.0.1.evil.example"),
    ("host=localhost. port=5432", {}, "localhost."),
    ("host=::ffff:127.0.0.1", {}, "::ffff:127.0.0.1"),
    ("host=/run/pg hostaddr=10.0.0.5", {}, "10.0.0.5"),                  # hostaddr is where libpq connects
    ("service=prod", {}, "the hosts of service 'prod'"),                 # its file may name any host
    ("", {"PGSERVICE": "prod"}, "the hosts of service 'prod'"),
    ("host=/run/postgresql", {}, None),                                  # a unix socket
    ("", {}, None),                                                      # libpq's default: the unix socket
    ("host=@abstract", {}, None),
    ("host=127.0.0.1 port=5432", {}, None),
    ("postgresql://sidecar@[::1]:5432/sidecar", {}, None),
    ("host=localhost", {}, None),
    ("hostaddr=127.0.0.1 host=db.example", {}, None),                    # the name only for TLS; loopback
    ("host=db.example sslmode=verify-full", {}, None),
    ("host=db.example sslmode=verify-ca", {}, None),
    ("host=db.example", {"PGSSLMODE": "verify-full"}, None),
    ("service=prod sslmode=verify-full", {}, None),
    ("", {"PGHOST": "/run/postgresql"}, None),
]


@pytest.mark.parametrize("section, what", [("escalation", "escalations (argument previews, approvers, decisions)"),
                                           ("usage", "every call's usage counters (callers, tools, tasks)")])
@pytest.mark.parametrize("dsn, env, host", POSTGRES)
def test_postgres_is_reached_off_the_pod_only_over_verified_tls(monkeypatch, section, what, dsn, env, host):
    for name in ("PGHOST", "PGHOSTADDR", "PGSSLMODE", "PGSERVICE", "PGREQUIRESSL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = {**DEV, f"{section}.store": "postgres", f"{section}.dsn": dsn}
    if host is None:
        load_config(None, settings)
    else:
        with pytest.raises(ConfigError) as info:
            load_config(None, settings)
        message = str(info.value)
        key = f"{section}.dsn" + ("" if dsn else " (the PG* variables)")
        assert message.startswith(f"{key}: {what} would go to PostgreSQL at {host} with sslmode="), message
        assert f"or set {section}.dsn_allow_plaintext: true where the network encrypts the hop" in message
        assert "s3cret" not in message
    load_config(None, {**settings, f"{section}.dsn_allow_plaintext": True})  # the opt-in


@pytest.mark.parametrize("section", ["escalation", "usage"])
def test_a_dsn_libpq_cannot_read_is_refused_without_quoting_it(section):
    for opt_in in (False, True):
        with pytest.raises(ConfigError, match=rf"^{section}\.dsn: not a libpq connection string") as info:
            load_config(None, {**DEV, f"{section}.store": "postgres", f"{section}.dsn": "password=s3cret host",
                               f"{section}.dsn_allow_plaintext": opt_in})
        assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("key", ["escalation.console_url", "console.jaeger_url"])
def test_links_are_not_sent_to_so_no_rule_applies(key: str):
    """escalation.console_url and console.jaeger_url only build links (in a notice, on the console's page):
    the sidecar sends nothing there, and the notice itself is what the webhook rule covers. An http:// link
    off loopback loads; where a person's browser then goes is the page's server's to secure."""
    config = load_config(None, {**DEV, key: "http://approvals.example.org"})
    section, name = key.split(".")
    assert getattr(getattr(config, section), name) == "http://approvals.example.org"


@pytest.mark.parametrize("endpoint", ["https://collector:99999", "collector:99999", "collector", "127.0.0.1:",
                                      "ftp://collector:4317"])
def test_a_telemetry_endpoint_with_no_port_or_one_past_65535_is_refused(endpoint: str):
    """The exporter would dial a port past 65535 modulo 65536 (another server gets the spans) or fail at every
    export; refused at load with the forms that work, whatever the plaintext opt-in."""
    for opt_in in (False, True):
        with pytest.raises(ConfigError, match=r"^telemetry\.endpoint: (not a valid URL|must be an http)"):
            load_config(None, {**DEV, "telemetry.endpoint": endpoint, "telemetry.allow_plaintext": opt_in})
    for good in GOOD_ENDPOINTS:
        load_config(None, {**DEV, "telemetry.endpoint": good})


GOOD_ENDPOINTS = ("https://otel-collector.observability.svc:4317", "localhost:4317", "[::1]:4317",
                  "http://127.0.0.1:4318/v1/traces")


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
@pytest.mark.parametrize("endpoint", ["https://collector:99999", "collector:99999", "collector", "127.0.0.1:",
                                      "ftp://collector:4317", "http://:4318"])
def test_an_endpoint_from_the_environment_is_held_to_the_same_shape(protocol: str, variable: str, endpoint: str):
    """telemetry.endpoint "" leaves the endpoint to the OTEL_* variables: the same forms are refused where the
    exporter is built (at start), naming the variable, whatever the plaintext opt-in."""
    from sidecar.evidence.spans import exporter_from_env

    for opt_in in (False, True):
        with pytest.raises(ConfigError, match=rf"^{variable}: (not a valid URL|must be an http)"):
            exporter_from_env(protocol=protocol, allow_plaintext=opt_in, environ={variable: endpoint})
    for good in GOOD_ENDPOINTS:
        exporter_from_env(protocol=protocol, environ={variable: good}).shutdown()
