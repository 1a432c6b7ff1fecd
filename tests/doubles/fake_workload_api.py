"""TEST DOUBLE: a fake SPIFFE Workload API (the SPIRE agent's socket), only for what SPIRE will not do.

Not production code. The identity tests run against the real SPIRE server and
agent (tests/infra/spire.py, tests/test_spire_*.py): the sidecar's SVID and
bundles, rotation, "no identity issued", a deleted registration, the agent
going away, mTLS and JWT-SVIDs, other trust domains, key rotation and
revocation. This double stays for
the cases a real SPIRE cannot be made to produce:

- forged credentials: tokens and certificates signed by keys that look like
  the trust domain's (tests/doubles/pki.py), a partner CA vouching for our IDs;
- malformed ones: upper-case or over-long IDs, two URI SANs, oversized tokens;
- expired ones on demand: an SVID that arrives already expired, a 1-second
  certificate; an agent that hangs without answering, X.509-SVIDs without
  JWT bundles.

It speaks the real protocol over a unix socket, using the `SpiffeWorkloadAPI`
stubs that ship inside the `spiffe` wheel (`spiffe._proto`), and behaves like
the SPIRE agent where it matters:

- every RPC requires the `workload.spiffe.io: true` header
  (INVALID_ARGUMENT "security header missing from request" otherwise);
- with no identity it answers PERMISSION_DENIED "no identity issued";
- the streaming RPCs (FetchX509SVID, FetchJWTBundles) push a new response
  whenever the test changes something (`set_identity`, `set_svids`,
  `publish_jwt_bundles`, `federate_with`) and end with PERMISSION_DENIED on `withdraw()`.

Test controls beyond SPIRE: `hang()` makes new calls block without answering,
`stop()` makes the agent go away (socket removed), `start()` brings it back
on the same path with the same state.
"""

from __future__ import annotations

import os
import threading
from concurrent import futures
from typing import Iterable

import grpc
import jwt
from google.protobuf import struct_pb2
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.doubles.pki import TestCa, TestJwtAuthority, TestSvid

SECURITY_HEADER = ("workload.spiffe.io", "true")


class _Watched:
    """A value with a version; streams wait on the condition for a newer one."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.version = 0
        self.value = None

    def set(self, value) -> None:
        with self.cond:
            self.value = value
            self.version += 1
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class FakeWorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """TEST DOUBLE of the SPIRE agent's Workload API on `socket_path`."""

    def __init__(
        self,
        socket_path: str,
        trust_domain: str = "example.org",
        *,
        ca: TestCa | None = None,
        jwt_authority: TestJwtAuthority | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.trust_domain = trust_domain
        self.ca = ca or TestCa(trust_domain)
        self.jwt_authority = jwt_authority or TestJwtAuthority(trust_domain)
        # Other trust domains' bundles (federation): td -> (TestCa | None, TestJwtAuthority | None)
        self.federated: dict[str, tuple[TestCa | None, TestJwtAuthority | None]] = {}
        self.svids: list[TestSvid] = []
        self.svid_ttl = 3600.0
        self.dns_names: tuple[str, ...] = ()
        self.calls: list[str] = []
        self._x509 = _Watched()
        self._jwt = _Watched()
        self._hang = threading.Event()
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None

    # ------------------------------------------------------------ controls
    @property
    def endpoint(self) -> str:
        """What SPIFFE_ENDPOINT_SOCKET would hold: unix:///abs/path."""
        return f"unix://{self.socket_path}"

    def set_identity(self, *paths: str, ttl: float | None = None, dns_names: tuple[str, ...] | None = None) -> list[TestSvid]:
        """Issue fresh SVIDs (first is the default) and push them to every X.509 stream."""
        if ttl is not None:
            self.svid_ttl = ttl
        if dns_names is not None:
            self.dns_names = dns_names
        svids = [self.ca.issue(p, ttl=self.svid_ttl, dns_names=self.dns_names) for p in paths]
        return self.set_svids(svids)

    def set_svids(self, svids: Iterable[TestSvid]) -> list[TestSvid]:
        """Push exactly these SVIDs (lets a test hand out an odd or expired one)."""
        self.svids = list(svids)
        self._x509.set(self._x509_response())
        return self.svids

    def withdraw(self) -> None:
        """The registration entry is gone: streams end PERMISSION_DENIED "no identity issued"."""
        self.svids = []
        self._x509.set(None)

    def publish_jwt_bundles(self) -> None:
        bundles = {self.trust_domain: self.jwt_authority.jwks()}
        for td, (_, authority) in self.federated.items():
            if authority is not None:
                bundles[td] = authority.jwks()
        self._jwt.set(workload_pb2.JWTBundlesResponse(bundles=bundles))

    def federate_with(self, trust_domain: str, *, ca: TestCa | None = None,
                      jwt_authority: TestJwtAuthority | None = None) -> None:
        """Add another trust domain's bundles (as SPIRE federation would) and push them."""
        self.federated[trust_domain] = (ca, jwt_authority)
        if self.svids:
            self._x509.set(self._x509_response())
        if self._jwt.value is not None:
            self.publish_jwt_bundles()

    def hang(self, on: bool = True) -> None:
        """New calls block without ever answering (a wedged agent)."""
        if on:
            self._hang.set()
        else:
            self._hang.clear()

    def start(self) -> "FakeWorkloadApi":
        self._stopping.clear()
        # Every open stream pins a worker thread in a sync grpc server: be generous.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self, self._server)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._server.add_insecure_port(f"unix:{self.socket_path}")
        self._server.start()
        return self

    def stop(self) -> None:
        """The agent goes away: open streams are cut and the socket file is removed."""
        self._stopping.set()
        self._x509.wake()
        self._jwt.wake()
        if self._server is not None:
            self._server.stop(grace=0).wait()
            self._server = None
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    # ------------------------------------------------------------ helpers
    def _x509_response(self) -> workload_pb2.X509SVIDResponse | None:
        if not self.svids:
            return None
        federated = {td: ca.bundle_der() for td, (ca, _) in self.federated.items() if ca is not None}
        return workload_pb2.X509SVIDResponse(
            svids=[
                workload_pb2.X509SVID(
                    spiffe_id=s.spiffe_id,
                    x509_svid=s.chain_der(),
                    x509_svid_key=s.key_der(),
                    bundle=self.ca.bundle_der(),
                )
                for s in self.svids
            ],
            federated_bundles=federated,
        )

    def _check(self, context: grpc.ServicerContext, name: str) -> None:
        self.calls.append(name)
        if dict(context.invocation_metadata()).get(SECURITY_HEADER[0]) != SECURITY_HEADER[1]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")
        while self._hang.is_set() and context.is_active() and not self._stopping.is_set():
            self._stopping.wait(0.05)

    def _stream(self, watched: _Watched, context: grpc.ServicerContext, name: str):
        self._check(context, name)
        context.add_callback(watched.wake)
        seen = -1
        while context.is_active() and not self._stopping.is_set():
            with watched.cond:
                if watched.version == seen:
                    watched.cond.wait(timeout=0.2)
                    continue
                seen, value = watched.version, watched.value
            if value is None:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            yield value

    # ------------------------------------------------------------ RPCs
    def FetchX509SVID(self, request, context):
        yield from self._stream(self._x509, context, "FetchX509SVID")

    def FetchX509Bundles(self, request, context):
        self._check(context, "FetchX509Bundles")
        bundles = {self.trust_domain: self.ca.bundle_der()}
        bundles.update({td: ca.bundle_der() for td, (ca, _) in self.federated.items() if ca is not None})
        yield workload_pb2.X509BundlesResponse(bundles=bundles)

    def FetchJWTBundles(self, request, context):
        yield from self._stream(self._jwt, context, "FetchJWTBundles")

    def FetchJWTSVID(self, request, context):
        self._check(context, "FetchJWTSVID")
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        svids = [s for s in self.svids if not request.spiffe_id or s.spiffe_id == request.spiffe_id]
        if not svids:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        audience = list(request.audience)
        return workload_pb2.JWTSVIDResponse(
            svids=[
                workload_pb2.JWTSVID(
                    spiffe_id=s.spiffe_id,
                    svid=self.jwt_authority.mint(s.spiffe_id, audience[0] if len(audience) == 1 else audience),
                )
                for s in svids
            ]
        )

    def ValidateJWTSVID(self, request, context):
        self._check(context, "ValidateJWTSVID")
        if not request.audience or not request.svid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid must be specified")
        try:
            if jwt.get_unverified_header(request.svid).get("kid") != self.jwt_authority.kid:
                raise jwt.InvalidTokenError("unknown kid")
            claims = jwt.decode(request.svid, self.jwt_authority.key.public_key(), algorithms=["ES256"],
                                audience=request.audience)
        except jwt.PyJWTError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        struct = struct_pb2.Struct()
        struct.update(claims)
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=claims["sub"], claims=struct)
