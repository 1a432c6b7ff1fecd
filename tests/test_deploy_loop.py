"""deploy/k8s runs the whole loop: an escalated call approved by a person through the console (issue 14 item 1).

No cluster runs here. What the manifests configure is run as real processes
on loopback, from the same files the ConfigMaps carry:

- the agent sidecar's config (ConfigMap agent-sidecar-config), in two
  sidecars (two agent pods) whose identity is real SPIRE (tests/infra/spire.py,
  trust domain example.org as in the manifests): the research agent's SVID on
  the unix socket, mutual TLS on the TCP port, JWT-SVIDs checked against the
  shared audience;
- OPA run with the OPA container's arguments on the signed bundle (ConfigMaps
  agent-policy, agent-policy-verification), built by `make deploy-bundle`'s
  code with a throwaway key;
- PostgreSQL (tests/doubles/postgres.py, the real server) as agent-postgres
  runs it: TLS only with its X.509-SVID from SPIRE, client certificates
  required (tests/test_deploy_tls.py `manifest_postgres`); reached through the
  PG* variables the StatefulSet sets (verify-full, the agent pod's SVID as the
  client certificate), shared by both sidecars for escalations and usage
  counters;
- `agent-sidecar console` with the console's config (ConfigMap
  approvals-console-config): its JWT-SVID file written from SPIRE for the
  console's own SPIFFE ID (what spiffe-helper does in the pod), people named
  by the header oauth2-proxy sets.

Replaced, because their binaries are not on this machine: oauth2-proxy (the
test sends the header it would set, after checking the manifest passes it and
strips it from clients) and ghostunnel (`MtlsRelay` below: plaintext on
loopback in, mutual TLS with the console's X.509-SVID out, the far end's
SPIFFE ID checked as `--verify-uri` says). Paths and ports differ; nothing
else in the configs is changed.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tests.test_deploy_k8s as k8s
import tests.test_deploy_tls as tls
from sidecar.client import AsyncClient
from sidecar.config import load_config
from tests.conftest import REPO
from tests.infra.spire import X509Svid, own_process_selectors
from tests.test_deploy_k8s import built  # noqa: F401  (module fixture: deploy/k8s with a signed bundle)
from tests.test_deploy_tls import spire  # noqa: F401  (module fixture: SPIRE in the manifests' trust domain)

TD = "example.org"
APPROVER = "alice@example.org"


def manifest_config(namespace: str, config_map: str, key: str) -> dict:
    return yaml.safe_load(k8s.config_map_files(namespace, config_map)[key])


def statefulset_env() -> dict[str, dict]:
    sidecar = k8s.container(k8s.pod_spec("research-agent"), "agent-sidecar")
    return {e["name"]: e for e in sidecar["env"]}


def console_deployment() -> dict:
    return k8s.pod_spec("approvals-console")


# --- the manifests agree with each other ------------------------------------------------------------------------


def test_the_sidecars_share_the_postgres_of_the_example():
    config = k8s.sidecar_config()
    assert config.escalation.store == config.usage.store == "postgres"
    assert config.escalation.dsn == config.usage.dsn == "", "the PG* variables of the StatefulSet"
    variables = statefulset_env()
    _, postgres, port = k8s.service_target(variables["PGHOST"]["value"], int(variables["PGPORT"]["value"]))
    postgres_env = {e["name"]: e for e in postgres["env"]}
    assert postgres_env["POSTGRES_DB"]["value"] == variables["PGDATABASE"]["value"]
    assert postgres_env["POSTGRES_USER"]["value"] == variables["PGUSER"]["value"]
    assert postgres_env["POSTGRES_PASSWORD"]["valueFrom"] == variables["PGPASSWORD"]["valueFrom"]
    assert port == 5432


def test_the_console_is_behind_oauth2_proxy_and_reaches_the_sidecars_over_mtls():
    console = load_config_text(k8s.config_map_files("approvals", "approvals-console-config")["console.yaml"])
    console.validate_console()  # outside dev mode: trusted header, token file, no dev approver
    assert console.identity.sources != ["dev"]
    spec = console_deployment()
    proxy = k8s.container(spec, "oauth2-proxy")
    # The Service exposes only oauth2-proxy; it forwards to the console on loopback.
    service = k8s.find("Service", "approvals-console")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["oauth2-proxy"]
    assert k8s.flag(proxy["args"], "--upstream") == f"http://{console.console.listen}/"
    assert console.console.listen.startswith("127.0.0.1:")
    # The header the console trusts is the one oauth2-proxy sets, and strips from the browser's requests.
    assert console.console.trusted_header == "X-Forwarded-Email"
    assert k8s.flag(proxy["args"], "--pass-user-headers") == "true"
    assert k8s.flag(proxy["args"], "--skip-auth-strip-headers") == "true"
    # ghostunnel: the console's sidecar address, to the agent-sidecars Service, checking the agents' SPIFFE ID.
    relay = k8s.container(spec, "ghostunnel")
    assert k8s.flag(relay["args"], "--listen") == console.console.sidecar
    host, port = k8s.flag(relay["args"], "--target").rsplit(":", 1)
    service, sidecar, sidecar_port = k8s.service_target(host, int(port))
    agent_config = k8s.sidecar_config()
    assert sidecar["name"] == "agent-sidecar" and sidecar_port == int(agent_config.listen.tcp.rsplit(":", 1)[1])
    assert "mtls" in agent_config.identity.sources
    assert k8s.flag(relay["args"], "--verify-uri") == k8s.RESEARCH_AGENT
    # The console's own identity, in the sidecars' console_identities; its JWT-SVID for their audience.
    registration = k8s.find("ClusterSPIFFEID", "approvals-console")["spec"]
    console_id = (registration["spiffeIDTemplate"].replace("{{ .TrustDomain }}", TD)
                  .replace("{{ .PodMeta.Namespace }}", "approvals")
                  .replace("{{ .PodSpec.ServiceAccountName }}", spec["serviceAccountName"]))
    assert agent_config.escalation.console_identities == [console_id]
    helper = k8s.config_map_files("approvals", "approvals-console-spiffe-helper")["helper.conf"].decode()
    assert f'jwt_audience = "{agent_config.identity.jwt_audience}"' in helper
    token_file = Path(console.console.token_file)
    assert f'jwt_svid_file_name = "{token_file.name}"' in helper
    assert f'cert_dir = "{token_file.parent}"' in helper
    assert str(token_file.parent) == k8s.mount_path(k8s.container(spec, "console"), "console-svid")
    # Approvers are people, the same on both sides.
    assert console.escalation.approvers == agent_config.escalation.approvers
    assert all(a.startswith("email:") for a in agent_config.escalation.approvers)
    # The agents' NetworkPolicy admits the console only, on that port.
    (rule,) = k8s.find("NetworkPolicy", "research-agent-deny-ingress")["spec"]["ingress"]
    assert rule["ports"] == [{"port": sidecar_port, "protocol": "TCP"}]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= k8s.workload("approvals-console")["spec"][
        "template"]["metadata"]["labels"].items()


def load_config_text(text: bytes | str):
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    try:
        return load_config(f.name)
    finally:
        Path(f.name).unlink()


# --- the loop, with real processes ------------------------------------------------------------------------------


def spiffe_id_of(certificate_der: bytes) -> str:
    cert = x509.load_der_x509_certificate(certificate_der)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""


class MtlsRelay:
    """TEST DOUBLE for ghostunnel in client mode (its binary is not on this machine).

    Listens in plaintext on loopback; for each connection opens mutual TLS to
    `target` with the console's X.509-SVID, trusting SPIRE's bundle, and
    accepts the far end only if its certificate's SPIFFE ID is `verify_uri`
    (ghostunnel's --verify-uri). Bytes are copied both ways.
    """

    def __init__(self, svid: X509Svid, target: str, verify_uri: str, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "chain.pem").write_bytes(svid.chain_pem)
        (directory / "key.pem").write_bytes(svid.key_pem)
        (directory / "bundle.pem").write_bytes(svid.bundle_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False  # a SPIFFE ID is checked, not a host name
        self.context.load_verify_locations(directory / "bundle.pem")
        self.context.load_cert_chain(directory / "chain.pem", directory / "key.pem")
        self.context.set_alpn_protocols(["h2"])
        self.target = target
        self.verify_uri = verify_uri
        self.refused: list[str] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.target.rsplit(":", 1)
        try:
            far_reader, far_writer = await asyncio.open_connection(host, int(port), ssl=self.context)
        except (OSError, ssl.SSLError) as exc:
            self.refused.append(str(exc))
            writer.close()
            return
        peer = spiffe_id_of(far_writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
        if peer != self.verify_uri:
            self.refused.append(f"far end is {peer}")
            far_writer.close()
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, far_writer), pipe(far_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def sidecar_config_for(tmp_path: Path, name: str, spire_agent, opa_url: str, catalog: Path):
    """The ConfigMap's sidecar.yaml with this machine's paths and ports (every other key as shipped)."""
    socket_dir = Path(tempfile.mkdtemp(prefix=f"lp-{name}-", dir="/tmp"))
    source = tmp_path / f"{name}.yaml"
    source.write_bytes(k8s.config_map_files("agents", "agent-sidecar-config")["sidecar.yaml"])
    return load_config(source, {
        "listen.tcp": "127.0.0.1:0",
        "listen.unix": str(socket_dir / "sidecar.sock"),
        "policy.dir": str(catalog),
        "policy.opa": {"url": opa_url},
        "identity.workload_api_socket": spire_agent.endpoint,
        "evidence.dir": str(tmp_path / name / "evidence"),
        "telemetry.exporter": "none",
        "sidecar.instance_id": name,
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_console(config_path: Path, listen: str, sidecar: str, log: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "console", "--config", str(config_path), "--listen", listen,
        "--sidecar", sidecar, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            assert process.returncode is None, f"console exited: {log.read_text()[-3000:]}"
            try:
                async with http.get(f"http://{listen}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"console did not start: {log.read_text()[-3000:]}"
            await asyncio.sleep(0.1)


async def test_an_escalated_call_is_approved_through_the_console_and_retried_once(
    spire, tmp_path, running_sidecar, monkeypatch
):
    # SPIRE: the agent pod's SVID for this process (the sidecars), the console's for its own workload.
    node = spire.agent("node-loop")
    node.register("/ns/agents/sa/research-agent", *own_process_selectors())
    console_workload = node.workload("approvals-console")
    node.register("/ns/approvals/sa/approvals-console", *console_workload.selectors)
    console_svid = console_workload.wait_for_identity()

    # PostgreSQL over mutual TLS, through the PG* variables as the StatefulSet sets them (tests/test_deploy_tls.py):
    # the database's SVID names agent-postgres's host; the sidecars' client files are what the pod's spiffe-helper writes.
    postgres_svid = tls.registered(node, node.workload("agent-postgres"), "agent-postgres")
    client_files = tls.write_svid_files(tls.registered_agent(node, "agent-helper"),
                                        ("agents", "agent-sidecar-spiffe-helper"), tmp_path / "sidecar-svid")

    # The sidecar reads the catalog where its subPath mount puts it.
    catalog = tmp_path / "policy"
    (catalog / "sidecar" / "catalog").mkdir(parents=True)
    (catalog / "sidecar" / "catalog" / "data.yaml").write_bytes(
        k8s.config_map_files("agents", "agent-policy")["catalog.yaml"])

    console_process = None
    relay = None
    with tls.manifest_postgres(postgres_svid) as (server, _), k8s.opa_serving(k8s.pod_opa_command(tmp_path / "pod")) as opa_url:
        tls.apply_environment(monkeypatch, tls.sidecar_pg_environment(server, client_files))
        first = await running_sidecar(sidecar_config_for(tmp_path, "agent-0", node, opa_url, catalog))
        second = await running_sidecar(sidecar_config_for(tmp_path, "agent-1", node, opa_url, catalog))
        try:
            for sidecar in (first, second):
                await wait_for_health(sidecar)

            # The manifest's readiness probe, run as the kubelet would, against the first sidecar's socket.
            probe = k8s.container(k8s.pod_spec("research-agent"), "agent-sidecar")["readinessProbe"]["exec"]["command"]
            unix = next(a for a in first.addresses if a.startswith("unix:"))
            probe = [sys.executable, *probe[1:-1],
                     probe[-1].replace("unix:/run/agent-sidecar/sidecar.sock", unix)]
            checked = await asyncio.create_subprocess_exec(*probe, cwd=REPO)
            assert await checked.wait() == 0

            # The agent asks its sidecar (pod 0) over the unix socket: the risk score escalates.
            call = ("create_ticket", {"title": "Rotate the staging database password"})
            fields = {"task_id": "loop-1", "intent": "tidy up after the incident", "signals": {"risk_score": 0.85}}
            async with AsyncClient(unix) as agent:
                escalated = await agent.authorize(*call, **fields)
            assert escalated.outcome == "escalate", escalated.reasons
            assert escalated.escalation_id
            assert any(r.startswith("risk_score_over_threshold") for r in escalated.reasons), escalated.reasons

            # The console (pod "approvals-console"), reaching the other sidecar (pod 1) over mTLS.
            tcp = next(a for a in second.addresses if not a.startswith("unix:"))
            relay = MtlsRelay(console_svid, tcp, k8s.RESEARCH_AGENT, tmp_path / "relay")
            relay_address = await relay.start()
            console_yaml = manifest_config("approvals", "approvals-console-config", "console.yaml")
            token_file = tmp_path / "console-svid" / Path(console_yaml["console"]["token_file"]).name
            token_file.parent.mkdir()
            audience = k8s.sidecar_config().identity.jwt_audience
            token_file.write_text(console_workload.fetch_jwt(audience))  # spiffe-helper's job in the pod
            csrf = tmp_path / "csrf"
            csrf.write_bytes(b"0123456789abcdef0123456789abcdef")
            console_yaml["console"]["token_file"] = str(token_file)
            console_yaml["console"]["csrf_secret_file"] = str(csrf)
            console_path = tmp_path / "console.yaml"
            console_path.write_text(yaml.safe_dump(console_yaml))
            listen = f"127.0.0.1:{free_port()}"
            console_process = await start_console(console_path, listen, relay_address, tmp_path / "console.log")

            header = console_yaml["console"]["trusted_header"]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{listen}/") as response:
                    assert response.status != 200, "nobody signed in at the proxy: no page"
                async with http.get(f"http://{listen}/", headers={header: APPROVER}) as response:
                    page = await response.text()
                    assert response.status == 200, page
                assert escalated.escalation_id in page, "the console lists the escalation from the shared store"
                token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
                async with http.post(
                    f"http://{listen}/escalations/{escalated.escalation_id}/decide",
                    data={"decision": "approve", "csrf_token": token, "note": "expected after the incident"},
                    headers={header: APPROVER}, allow_redirects=False,
                ) as response:
                    assert response.status == 303, await response.text()
            assert not relay.refused, relay.refused

            # The agent's retry with the escalation id: allowed once, through its own sidecar.
            async with AsyncClient(unix) as agent:
                retried = await agent.authorize(*call, **fields, escalation_id=escalated.escalation_id)
                again = await agent.authorize(*call, **fields, escalation_id=escalated.escalation_id)
            assert retried.outcome == "allow", retried.reasons
            assert again.outcome != "allow", again.reasons
            # Every connection the sidecars hold is TLS 1.3 with a client certificate.
            connections = tls.ssl_connections(server)
            assert connections and all(c[0] and c[1] == "TLSv1.3" and c[3] for c in connections), connections
        finally:
            if console_process is not None and console_process.returncode is None:
                console_process.terminate()
                await console_process.wait()
            if relay is not None:
                await relay.close()
            for sidecar in (first, second):
                await sidecar.stop(grace=0)

    # The evidence: the approval, recorded by the sidecar the console asked, names the person and the console.
    approvals = [r for r in evidence_records(tmp_path / "agent-1" / "evidence") if r["kind"] == "approval"]
    assert len(approvals) == 1, approvals
    (approval,) = approvals
    assert approval["approver"] == f"email:{APPROVER}"
    assert approval["approver_via"] == f"spiffe://{TD}/ns/approvals/sa/approvals-console"
    decisions = [r for r in evidence_records(tmp_path / "agent-0" / "evidence") if r["kind"] == "decision"]
    assert [d["outcome"] for d in decisions] == ["escalate", "allow", again.outcome]
    assert all(d["subject"]["spiffe_id"] == k8s.RESEARCH_AGENT for d in decisions)


def evidence_records(directory: Path) -> list[dict]:
    out = []
    for path in sorted(directory.glob("evidence-*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


async def wait_for_health(sidecar, timeout: float = 60) -> None:
    """SERVING: the SVID held, OPA's bundle active, the evidence log and PostgreSQL reachable."""
    unix = next(a for a in sidecar.addresses if a.startswith("unix:"))
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(unix) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            assert time.monotonic() < deadline, "sidecar did not become SERVING"
            await asyncio.sleep(0.1)
