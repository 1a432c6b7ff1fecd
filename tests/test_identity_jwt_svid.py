"""`jwt_svid`: JWT-SVIDs in `authorization: Bearer` metadata, validated against the JWT bundles.

Tokens come from the fake Workload API's ES256 authority (tests/doubles), or
are forged by tests/doubles/pki.py helpers for the bad-input cases.
"""

from __future__ import annotations

import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient

from sidecar.identity import IdentityError, PeerInfo
from sidecar.identity.jwt_svid import JwtSvidInvalid, JwtSvidResolver, JwtSvidValidator, bearer_token
from sidecar.identity.workload_api import WorkloadApiSource
from tests.doubles.identity_harness import ProbeServer, ask, fake_agent, remove_dir, short_dir
from tests.doubles.pki import TestJwtAuthority, tamper_payload, unsigned_token

AUD = "spiffe://example.org/ns/agents/sa/sidecar"
CALLER = "spiffe://example.org/ns/agents/sa/planner"


@pytest.fixture(scope="module")
def world():
    directory = short_dir()
    agent = fake_agent(directory, path="/ns/agents/sa/sidecar")
    partner = TestJwtAuthority("partner.example")
    agent.federate_with("partner.example", jwt_authority=partner)
    source = WorkloadApiSource(agent.endpoint, backoff_initial=0.02, backoff_max=0.1).start()
    assert source.wait_until_ready(30)
    deadline = time.monotonic() + 30  # the federated bundle arrives on the stream in the background
    while source.jwt_keys("partner.example") is None:
        assert time.monotonic() < deadline, "the partner's JWT keys never arrived"
        time.sleep(0.02)
    yield agent, source, partner
    source.close()
    agent.stop()
    remove_dir(directory)


@pytest.fixture
def agent(world):
    return world[0]


@pytest.fixture
def validator(world):
    return JwtSvidValidator(world[1], AUD)


def mint(agent, sub=CALLER, aud=AUD, **kw) -> str:
    return agent.jwt_authority.mint(sub, aud, **kw)


def refused(validator, token) -> str:
    with pytest.raises(JwtSvidInvalid) as info:
        validator.validate(token)
    return str(info.value)


def test_valid_token(agent, validator):
    token = mint(agent, ttl=120)
    verified = validator.validate(token)
    assert verified.spiffe_id == CALLER
    assert verified.trust_domain == "example.org"
    subject = verified.subject()
    assert subject.source == "jwt_svid"
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    assert subject.svid_expires_at == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))


def test_audience_list_containing_ours_is_refused(agent, validator):
    # JWT-SVID spec 6.2: the holder of any other audience could replay the token here.
    for audiences in (["someone-else", AUD], [AUD, "someone-else"], [AUD, AUD]):
        assert "the token carries 2 audiences; a JWT-SVID presented here must carry exactly one" in refused(
            validator, mint(agent, aud=audiences))
    assert validator.validate(mint(agent, aud=[AUD])).spiffe_id == CALLER  # a one-element list is one audience


def test_token_fetched_by_py_spiffe_validates(agent, validator):
    with WorkloadApiClient(agent.endpoint, default_timeout=5) as client:
        svid = client.fetch_jwt_svid(audience={AUD})  # a set: a bare string would become its letters
    assert validator.validate(svid.token).spiffe_id == "spiffe://example.org/ns/agents/sa/sidecar"


def hmac_token(agent) -> str:
    """The classic confusion attack: HS256 keyed with the (public) verification key."""
    import base64
    import hashlib
    import hmac
    import json

    from cryptography.hazmat.primitives import serialization

    public_pem = agent.jwt_authority.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "JWT", "kid": agent.jwt_authority.kid}
    claims = {"sub": CALLER, "aud": AUD, "exp": int(time.time()) + 300}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"


BAD_CASES = {
    "wrong audience": (lambda a: mint(a, aud="spiffe://example.org/someone-else"), "audience does not include"),
    "expired": (lambda a: mint(a, ttl=-30), "expired at"),
    "unknown kid": (lambda a: TestJwtAuthority().mint(CALLER, AUD), "unknown kid"),
    "forged with a known kid": (
        lambda a: TestJwtAuthority(kid=a.jwt_authority.kid).mint(CALLER, AUD),
        "signature does not verify",
    ),
    "alg none": (
        lambda a: unsigned_token({"sub": CALLER, "aud": AUD, "exp": int(time.time()) + 300},
                                 {"kid": a.jwt_authority.kid}),
        "alg 'none'",
    ),
    "alg None spelled differently": (
        lambda a: unsigned_token({"sub": CALLER, "aud": AUD, "exp": int(time.time()) + 300}, {"alg": "NONE"}),
        "alg 'none'",
    ),
    "HMAC with the public key as secret": (
        lambda a: hmac_token(a),
        "alg 'HS256' is not allowed",
    ),
    "alg that does not fit the key": (
        lambda a: jwt.encode({"sub": CALLER, "aud": AUD, "exp": int(time.time()) + 300},
                             ec.generate_private_key(ec.SECP384R1()), algorithm="ES384",
                             headers={"kid": a.jwt_authority.kid}),
        "does not fit alg ES384",
    ),
    "foreign trust domain": (
        lambda a: TestJwtAuthority("evil.example").mint("spiffe://evil.example/agent", AUD),
        "trust domain evil.example is not accepted",
    ),
    "federated but not accepted": (
        lambda a: None,  # filled in by the test: needs the partner authority
        "trust domain partner.example is not accepted",
    ),
    "tampered payload": (
        lambda a: tamper_payload(mint(a), sub="spiffe://example.org/ns/agents/sa/admin"),
        "signature does not verify",
    ),
    "tampered expiry": (
        lambda a: tamper_payload(mint(a, ttl=-30), exp=int(time.time()) + 3600),
        "signature does not verify",
    ),
    "over 8 KiB": (lambda a: mint(a, extra_claims={"pad": "x" * 9000}), "over the 8192-byte limit"),
    "upper-case sub": (
        lambda a: mint(a, sub="spiffe://Example.org/ns/agents/sa/planner"),
        "is not a valid SPIFFE ID",
    ),
    "over-long sub": (lambda a: mint(a, sub="spiffe://example.org/" + "a" * 2100), "longer than 2048 bytes"),
    "sub with trailing newline": (lambda a: mint(a, sub=CALLER + "\n"), "is not a valid SPIFFE ID"),
    "trust-domain-only sub": (lambda a: mint(a, sub="spiffe://example.org"), "names only a trust domain"),
    "no sub": (lambda a: a.jwt_authority.mint(CALLER, AUD, extra_claims={"sub": None}), "no sub claim"),
    "no kid": (lambda a: mint(a, headers={"kid": None}), "no kid"),
    "no exp": (lambda a: mint(a, extra_claims={"exp": None}), "no exp claim"),
    "exp in year 10000": (lambda a: mint(a, extra_claims={"exp": 253402300800}), "not a time before 10000-01-01"),
    "exp past 64 bits": (lambda a: mint(a, extra_claims={"exp": 2**63}), "not a time before 10000-01-01"),
    "not yet valid": (lambda a: mint(a, extra_claims={"nbf": int(time.time()) + 600}), "not valid yet"),
    "typ not JWT": (lambda a: mint(a, headers={"typ": "at+jwt"}), "typ 'at+jwt'"),
    "not a JWT": (lambda a: "not-a-token", "not a signed JWT"),
    "garbage header": (lambda a: "!!!.e30.sig", "not base64url JSON"),
    "no signature": (lambda a: mint(a).rsplit(".", 1)[0] + ".", "no signature"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_tokens_are_refused_with_a_reason(world, validator, case):
    agent, _, partner = world
    make, reason = BAD_CASES[case]
    token = partner.mint("spiffe://partner.example/agent", AUD) if case == "federated but not accepted" else make(agent)
    assert reason in refused(validator, token)


def test_federated_trust_domain_when_accepted(world):
    agent, source, partner = world
    validator = JwtSvidValidator(source, AUD, trust_domains=("example.org", "partner.example"))
    token = partner.mint("spiffe://partner.example/agent", AUD)
    assert validator.validate(token).spiffe_id == "spiffe://partner.example/agent"
    # The partner's key cannot sign for our trust domain.
    forged = partner.mint(CALLER, AUD, headers={"kid": partner.kid})
    assert "unknown kid" in refused(validator, forged)
    # Accepted in config but no bundle from the Workload API.
    lonely = JwtSvidValidator(source, AUD, trust_domains=("nobody.example",))
    assert "no JWT bundle for trust domain nobody.example" in refused(
        lonely, TestJwtAuthority("nobody.example").mint("spiffe://nobody.example/a", AUD))


def test_bearer_metadata_parsing():
    assert bearer_token({}) is None
    assert bearer_token({"authorization": "Bearer abc.def.ghi"}) == "abc.def.ghi"
    assert bearer_token({"authorization": "bearer   abc.def.ghi  "}) == "abc.def.ghi"
    for bad in ("Basic dXNlcjpwdw==", "Bearer", "Bearer ", "abc.def.ghi"):
        with pytest.raises(IdentityError, match="not 'Bearer <JWT-SVID>'"):
            bearer_token({"authorization": bad})
    with pytest.raises(IdentityError, match="more than one token"):
        bearer_token({"authorization": "Bearer a.b.c, Bearer d.e.f"})


def test_resolver(world, agent):
    source = world[1]
    resolver = JwtSvidResolver(JwtSvidValidator(source, AUD), source)
    peer = PeerInfo(transport="tcp", metadata={"authorization": f"Bearer {mint(agent)}"})
    assert resolver.applies(peer)
    assert resolver.resolve(peer).subject.spiffe_id == CALLER
    assert not resolver.applies(PeerInfo(transport="tcp"))
    with pytest.raises(IdentityError, match="^jwt_svid: the token expired at"):
        resolver.resolve(PeerInfo(transport="unix", metadata={"authorization": f"Bearer {mint(agent, ttl=-5)}"}))


async def test_over_grpc_every_bad_token_is_answered_and_the_server_lives(world, agent):
    source = world[1]
    directory = short_dir()
    probe = await ProbeServer(JwtSvidResolver(JwtSvidValidator(source, AUD), source), directory).start()
    try:
        target = f"unix:{probe.unix_path}"
        for case, (make, reason) in BAD_CASES.items():
            if case == "federated but not accepted":
                continue
            reply = await ask(target, metadata=[("authorization", f"Bearer {make(agent)}")])
            assert reason in reply["denied"], case
        # An oversized token reaches the resolver (the server allows 64 KiB of metadata) ...
        reply = await ask(target, metadata=[("authorization", "Bearer " + "a" * 20000)])
        assert "over the 8192-byte limit" in reply["denied"]
        # ... and the server still answers good callers.
        reply = await ask(target, metadata=[("authorization", f"Bearer {mint(agent)}")])
        assert reply["subject"]["spiffe_id"] == CALLER
        assert reply["subject"]["source"] == "jwt_svid"
        # A token on plain TCP is the same JWT check.
        reply = await ask(f"127.0.0.1:{probe.tcp_port}", metadata=[("authorization", f"Bearer {mint(agent)}")])
        assert reply["subject"]["spiffe_id"] == CALLER and reply["transport"] == "tcp"
    finally:
        await probe.stop()
        remove_dir(directory)


def test_grpc_default_metadata_limit_would_hide_oversized_tokens():
    """Why GRPC_SERVER_OPTIONS raises grpc.max_metadata_size: without it, no decision is recorded."""
    import asyncio

    async def run() -> grpc.StatusCode:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {"M": grpc.unary_unary_rpc_method_handler(lambda r, c: b"")}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.unary_unary("/t.T/M")(b"", timeout=5, metadata=[("authorization", "Bearer " + "a" * 20000)])
        except grpc.RpcError as exc:
            return exc.code()
        finally:
            await server.stop(0)
        return grpc.StatusCode.OK

    assert asyncio.run(run()) == grpc.StatusCode.RESOURCE_EXHAUSTED
