"""deploy/k8s: manifests valid offline, files present, config loadable, a signed bundle OPA verifies, containers agreeing.

No cluster, kustomize or kubectl here: the kustomization is read as data
(its resources and configMapGenerators are what `kubectl apply -k` would
send), every manifest and generated ConfigMap is validated against the
Kubernetes OpenAPI schemas of one pinned version with `kubernetes-validate`
(strict: unknown fields are errors). Custom resources are not in those
schemas: the ClusterSPIFFEID is checked against the subset of the SPIRE
Controller Manager's CRD schema written below (an unknown field or a wrong
type fails), and no other custom kind is allowed in.

The policy files (deploy/k8s/policy/) are built by `make deploy-bundle` with
the operator's key and never committed: the tests build them with a
throwaway key into a copy of deploy/k8s, and run the real OPA on the signed
bundle the way the pod's OPA container does.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sidecar.config import Config, ConfigError, load_config
from tests.conftest import REGO, REPO

SOURCE = REPO / "deploy" / "k8s"
K8S = SOURCE  # swapped for the built copy while this module's tests run (the `built` fixture)
OPA = str(REPO / ".tools" / "bin" / "opa")
KUBERNETES_VERSION = "1.34.0"  # the oldest Kubernetes the example targets (native sidecars are GA since 1.33)

sys.path.insert(0, str(REPO / "deploy"))
import sync_bundle  # noqa: E402  (deploy/sync_bundle.py, behind `make deploy-bundle`)


def rsa_key(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory) -> Iterator[Path]:
    """deploy/k8s with its policy/ built by `make deploy-bundle`'s code, signed with a throwaway key."""
    global K8S
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(SOURCE, root, ignore=lambda d, names: [n for n in names if Path(d).name == "policy" and n != ".gitignore"])
    sync_bundle.build(rsa_key(root.parent / "signing.pem"), out=root / "policy", opa=OPA)
    K8S = root
    yield root
    K8S = SOURCE


# --- reading the kustomization ------------------------------------------------------------------


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def resource_documents() -> list[tuple[str, dict]]:
    """The manifests listed in resources (the same in deploy/k8s and its built copy)."""
    found = []
    for rel in kustomization()["resources"]:
        for document in yaml.safe_load_all((K8S / rel).read_text()):
            if document:
                found.append((rel, document))
    return found


def generator_entries(generator: dict) -> list[tuple[str, Path]]:
    """(key, file) pairs of a configMapGenerator, as kustomize reads `files:`."""
    entries = []
    for item in generator.get("files", []):
        key, _, rel = item.partition("=") if "=" in item else (Path(item).name, "", item)
        entries.append((key, K8S / rel))
    return entries


def generated_config_maps() -> dict[tuple[str, str], dict]:
    """The ConfigMaps the configMapGenerators make (without kustomize's name hash).

    As kustomize does, a file that is not UTF-8 text goes into binaryData, base64.
    """
    made = {}
    for generator in kustomization().get("configMapGenerator", []):
        data, binary = {}, {}
        for key, path in generator_entries(generator):
            content = path.read_bytes()
            try:
                data[key] = content.decode("utf-8")
            except UnicodeDecodeError:
                binary[key] = base64.b64encode(content).decode()
        namespace = generator.get("namespace", "default")
        made[(namespace, generator["name"])] = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"], "namespace": namespace},
            "data": data,
            **({"binaryData": binary} if binary else {}),
        }
    return made


def config_map_files(namespace: str, name: str) -> dict[str, bytes]:
    made = generated_config_maps()[(namespace, name)]
    files = {key: text.encode() for key, text in made["data"].items()}
    files.update({key: base64.b64decode(text) for key, text in made.get("binaryData", {}).items()})
    return files


def find(kind: str, name: str) -> dict:
    matches = [d for _, d in resource_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def workload(name: str) -> dict:
    matches = [d for _, d in resource_documents() if d["kind"] in WORKLOAD_KINDS and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one Deployment or StatefulSet {name}, found {len(matches)}"
    return matches[0]


def pod_spec(name: str) -> dict:
    return workload(name)["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container(spec: dict, name: str) -> dict:
    (found,) = [c for c in all_containers(spec) if c["name"] == name]
    return found


def mount_path(c: dict, volume: str) -> str:
    (path,) = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == volume]
    return path


def mount(c: dict, volume: str) -> dict:
    (found,) = [m for m in c.get("volumeMounts", []) if m["name"] == volume]
    return found


def volume(spec: dict, name: str) -> dict:
    (found,) = [v for v in spec["volumes"] if v["name"] == name]
    return found


def env(c: dict, name: str) -> dict:
    (found,) = [e for e in c.get("env", []) if e["name"] == name]
    return found


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == port]
    return number


def flag(args: list[str], name: str) -> str:
    """`--name=value` or `--name value` from a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    raise AssertionError(f"{name} not in {args}")


def sidecar_config() -> Config:
    return load_config(K8S / "agent" / "sidecar.yaml")


def service_target(host: str, port: int) -> tuple[dict, dict, int]:
    """The Service a cluster DNS name + port designates, and the container + port number behind it."""
    match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
    assert match, f"{host} is not a <service>.<namespace>.svc[.cluster.local] name"
    name, namespace = match.group(1), match.group(2)
    service = find("Service", name)
    assert service["metadata"]["namespace"] == namespace
    (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
    selector = service["spec"]["selector"]
    pods = [
        d for _, d in resource_documents()
        if d["kind"] in WORKLOAD_KINDS and d["metadata"]["namespace"] == namespace
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert len(pods) == 1, f"Service {name} selects {len(pods)} workloads"
    spec = pods[0]["spec"]["template"]["spec"]
    target = service_port.get("targetPort", port)
    for c in all_containers(spec):  # native sidecars (init containers) serve too
        if any(p["name"] == target or p["containerPort"] == target for p in c.get("ports", [])):
            return service, c, port_number(c, target)
    raise AssertionError(f"no container of {pods[0]['metadata']['name']} has port {target}")


# --- files ------------------------------------------------------------------------------------------


def test_kustomization_resources_and_generator_files_exist():
    k = kustomization()
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and k["kind"] == "Kustomization"
    paths = [K8S / rel for rel in k["resources"]]
    paths += [path for g in k["configMapGenerator"] for _, path in generator_entries(g)]
    for path in paths:
        assert path.is_file(), f"{path} is missing"
        # kustomize's default load restrictor: nothing outside deploy/k8s.
        assert path.resolve().is_relative_to(K8S.resolve()), f"{path} is outside deploy/k8s"
    listed = {K8S / rel for rel in k["resources"]}
    on_disk = {p for p in K8S.rglob("*.yaml") if "policy" not in p.relative_to(K8S).parts[:1]}
    generated_from = {path for g in k["configMapGenerator"] for _, path in generator_entries(g)}
    assert on_disk - listed - generated_from - {K8S / "kustomization.yaml"} == set(), "a manifest is not in resources"
    assert "namespace" not in k, "a kustomization-wide namespace would be put on the ClusterSPIFFEID"


# --- schemas ---------------------------------------------------------------------------------------

LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

# spire.spiffe.io/v1alpha1 ClusterSPIFFEID, the fields of spire-controller-manager's CRD.
CLUSTER_SPIFFE_ID_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "spire.spiffe.io/v1alpha1"},
        "kind": {"const": "ClusterSPIFFEID"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "not": {"required": ["namespace"]},  # cluster-scoped
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["spiffeIDTemplate"],
            "additionalProperties": False,
            "properties": {
                "spiffeIDTemplate": {"type": "string", "pattern": r"^spiffe://"},
                "className": {"type": "string"},
                "podSelector": LABEL_SELECTOR,
                "namespaceSelector": LABEL_SELECTOR,
                "workloadSelectorTemplates": {"type": "array", "items": {"type": "string"}},
                "dnsNameTemplates": {"type": "array", "items": {"type": "string"}},
                "federatesWith": {"type": "array", "items": {"type": "string"}},
                "ttl": {"type": "string"},
                "jwtTtl": {"type": "string"},
                "admin": {"type": "boolean"},
                "downstream": {"type": "boolean"},
                "autoPopulateDNSNames": {"type": "boolean"},
                "hint": {"type": "string"},
                "fallback": {"type": "boolean"},
            },
        },
    },
}
CUSTOM_SCHEMAS = {("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"): CLUSTER_SPIFFE_ID_SCHEMA}


def validate(document: dict) -> None:
    custom = CUSTOM_SCHEMAS.get((document.get("apiVersion"), document.get("kind")))
    if custom is not None:
        jsonschema.validate(document, custom)
    else:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def validate_or_fail(where: str, document: dict) -> None:
    try:
        validate(document)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{where}: {exc.message} (a custom resource needs a schema in CUSTOM_SCHEMAS)")
    except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
        pytest.fail(f"{where}: {document['kind']} {document['metadata'].get('name')}: {exc.message} at {list(exc.absolute_path)}")


@pytest.mark.parametrize("where, document", list(resource_documents()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_manifest_validates_offline(where, document):
    validate_or_fail(where, document)


def test_every_generated_config_map_validates_offline():
    made = generated_config_maps()
    assert ("agents", "agent-policy") in made and "bundle.tar.gz" in made[("agents", "agent-policy")]["binaryData"]
    for (namespace, name), config_map in made.items():
        validate_or_fail(f"configMapGenerator {namespace}/{name}", config_map)
        size = sum(len(k) + len(v.encode()) for part in ("data", "binaryData") for k, v in config_map.get(part, {}).items())
        assert size < 1_000_000, f"{namespace}/{name}: a ConfigMap holds at most 1 MiB"


def test_the_validation_is_strict():
    deployment = copy.deepcopy(workload("research-agent"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = copy.deepcopy(workload("research-agent"))
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    registration = copy.deepcopy(find("ClusterSPIFFEID", "ai-agents"))
    registration["spec"]["podSelecter"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(registration)
    registration = copy.deepcopy(find("ClusterSPIFFEID", "ai-agents"))
    registration["metadata"]["namespace"] = "agents"
    with pytest.raises(jsonschema.ValidationError):
        validate(registration)


def _grant_matches(pattern: str, spiffe_id: str) -> bool:
    """OPA's glob.match(pattern, ["/"], id): * within a segment, ** across segments."""
    regex = "".join(
        "[^/]*" if part == "*" else ".*" if part == "**" else re.escape(part) for part in re.split(r"(\*\*|\*)", pattern)
    )
    return re.fullmatch(regex, spiffe_id) is not None


def test_the_cluster_spiffe_id_selects_the_agent_pod_and_its_id_is_granted():
    registration = find("ClusterSPIFFEID", "ai-agents")["spec"]
    deployment = workload("research-agent")
    namespace = deployment["metadata"]["namespace"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert registration["podSelector"]["matchLabels"].items() <= labels.items()
    assert registration["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert find("ServiceAccount", account)["metadata"]["namespace"] == namespace
    spiffe_id = (
        registration["spiffeIDTemplate"]
        .replace("{{ .TrustDomain }}", "example.org")
        .replace("{{ .PodMeta.Namespace }}", namespace)
        .replace("{{ .PodSpec.ServiceAccountName }}", account)
    )
    assert "{{" not in spiffe_id
    grants = yaml.safe_load((REGO / "sidecar" / "grants" / "data.yaml").read_text())
    tools = {tool for g in grants if _grant_matches(g["spiffe_id"], spiffe_id) for tool in g["tools"]}
    assert "search_docs" in tools, f"rego/ grants {spiffe_id} nothing the demo agent uses"


# --- the sidecar's config ------------------------------------------------------------------------------


def test_the_sidecar_config_loads_with_the_real_loader():
    config = sidecar_config()  # unknown keys or wrong types raise ConfigError
    assert config.policy.opa.url == "unix:///run/opa/opa.sock"  # the OPA container, not a managed OPA
    assert config.policy.reload is False
    # The agent on the unix socket; the console over mutual TLS with a JWT-SVID naming the same ID.
    assert config.identity.sources == ["jwt_svid", "mtls", "workload_api"]
    assert config.telemetry.exporter == "otlp"
    generated = generated_config_maps()[("agents", "agent-sidecar-config")]
    assert generated["data"]["sidecar.yaml"] == (K8S / "agent" / "sidecar.yaml").read_text()


# --- the policy bundle: built, signed, verified by the real OPA ------------------------------------------


def kubelet_config_map_volume(root: Path, files: dict[str, bytes]) -> Path:
    """A configMap volume as the kubelet writes it: ..<timestamp>/ files, ..data symlink, key symlinks."""
    stamp = root / "..2026_11_22_10_00_00.000000001"
    stamp.mkdir(parents=True)
    for key, content in files.items():
        (stamp / key).write_bytes(content)
    (root / "..data").symlink_to(stamp.name)
    for key in files:
        (root / key).symlink_to(f"..data/{key}")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod_opa_command(root: Path) -> list[str]:
    """The OPA container's command line, its two ConfigMap volumes laid out under root as the kubelet would."""
    spec = pod_spec("research-agent")
    opa = container(spec, "opa")
    args = list(opa["args"])
    for name in ("policy", "policy-verification"):
        config_map = volume(spec, name)["configMap"]["name"]
        target = kubelet_config_map_volume(root / name, config_map_files("agents", config_map))
        args = [arg.replace(mount_path(opa, name), str(target)) for arg in args]
    # the socket's volume, under a short path: a unix socket's path is at most 107 bytes
    socket_dir = Path(tempfile.mkdtemp(prefix="pod-opa-"))
    args = [f"--addr=unix://{socket_dir / 'opa.sock'}" if a.startswith("--addr=") else a for a in args]
    args = [f"--diagnostic-addr=127.0.0.1:{free_port()}" if a.startswith("--diagnostic-addr=") else a for a in args]
    return [OPA, *args]


@contextmanager
def opa_serving(command: list[str]) -> Iterator[str]:
    """Run `opa run --server` (on its unix socket, as in the pod) until it serves its bundle; yield its URL."""
    url = flag(command, "--addr")
    assert url.startswith("unix:///"), url
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"OPA exited: {process.stderr.read()}"
            try:
                probe = subprocess.run(curl(url, "/health?bundles=true"), capture_output=True, timeout=5)
                if probe.returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            assert time.monotonic() < deadline, "OPA did not activate its bundle"
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def opa_refuses(command: list[str]) -> str:
    """Run OPA on a bundle it must refuse: it exits non-zero at start; its error text."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, "OPA started on a bundle it should have refused"
    return done.stdout + done.stderr  # OPA prints its start-up error on stdout


def curl(url: str, path: str, *options: str) -> list[str]:
    """The curl command for `path` of the OPA at `url` (unix:///socket)."""
    return ["curl", "-sf", *options, "--unix-socket", url.removeprefix("unix://"), f"http://opa{path}"]


def decide(url: str, document: dict) -> dict:
    done = subprocess.run(curl(url, "/v1/data/sidecar/decision?provenance", "-X", "POST", "--data-binary", "@-"),
                          input=json.dumps({"input": document}), capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def decision_input(spiffe_id: str, source: str, tool: str, arguments: dict) -> dict:
    return {
        "version": "sidecar/v1",
        "subject": {"spiffe_id": spiffe_id, "source": source, "svid_expires_at": None},
        "delegation": [],
        "tool": {"name": tool, "server": "", "arguments": arguments, "catalog": None, "facts": {}},
        "task": {"id": "", "intent": ""},
        "signals": {},
        "approval": None,
        "usage": {"calls_in_window": 1, "window_seconds": 60, "calls_in_task": 0},
        "request": {"call_id": "c-1", "time": "2026-11-22T10:00:00Z", "sidecar": "test"},
    }


RESEARCH_AGENT = "spiffe://example.org/ns/agents/sa/research-agent"


def bundle_members() -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(config_map_files("agents", "agent-policy")["bundle.tar.gz"])) as tar:
        return {m.name.lstrip("/"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def repack(members: dict[str, bytes], path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(f"/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def test_opa_verifies_and_serves_the_signed_bundle_as_the_pod_runs_it(tmp_path):
    members = bundle_members()
    assert ".signatures.json" in members and ".manifest" in members
    revision = json.loads(members[".manifest"])["revision"]
    with opa_serving(pod_opa_command(tmp_path)) as url:
        answer = decide(url, decision_input(RESEARCH_AGENT, "workload_api", "search_docs", {"query": "q"}))
        assert answer["result"]["outcome"] == "allow", answer
        (reported,) = [b["revision"] for b in answer["provenance"]["bundles"].values()]
        assert reported == revision and revision.startswith("sha256:")
        # The production bundle holds no dev grant: the dev identity gets nothing.
        dev = decide(url, decision_input("spiffe://dev.local/agent", "dev", "search_docs", {"query": "q"}))
        assert dev["result"]["outcome"] == "deny"
        assert dev["result"]["reasons"] == ['not_granted: spiffe://dev.local/agent is not granted tool "search_docs"']


@pytest.mark.parametrize("tamper", ["changed data", "changed rule", "added rule", "removed rule", "no signature"])
def test_opa_refuses_a_tampered_bundle(tmp_path, tamper):
    members = bundle_members()
    if tamper == "changed data":
        data = json.loads(members["data.json"])
        data["sidecar"]["grants"].append({"spiffe_id": "spiffe://**", "tools": ["*"]})
        members["data.json"] = json.dumps(data).encode()
    elif tamper == "changed rule":
        members["sidecar/grants.rego"] += b"\ngranted(_, _) if true\n"
    elif tamper == "added rule":
        members["sidecar/backdoor.rego"] = b"package sidecar\n\nallow contains \"granted: backdoor\"\n"
    elif tamper == "removed rule":
        del members["sidecar/arguments.rego"]
    else:
        del members[".signatures.json"]
    command = pod_opa_command(tmp_path)
    bundle = Path(flag(command, "--bundle"))
    assert bundle.name == "bundle.tar.gz"
    target = bundle.resolve()  # the kubelet's file behind the key's symlink
    repack(members, target)
    error = opa_refuses(command)
    assert "bundle" in error and any(word in error for word in ("digest mismatch", "signature", "unexpected file", "missing")), error


def test_opa_refuses_a_bundle_signed_with_another_key(tmp_path):
    other = tmp_path / "other"
    sync_bundle.build(rsa_key(tmp_path / "other.pem"), out=other, opa=OPA)
    command = pod_opa_command(tmp_path / "pod")
    Path(flag(command, "--bundle")).resolve().write_bytes((other / "bundle.tar.gz").read_bytes())
    error = opa_refuses(command)
    assert "verification" in error or "signature" in error, error


def test_the_production_bundle_leaves_out_dev_grants_and_tests():
    names = set(bundle_members())
    assert not [n for n in names if n.endswith("_test.rego") or "/dev/" in n], names
    data = json.loads(bundle_members()["data.json"])
    assert "dev" not in data["sidecar"]
    assert not [g for g in data["sidecar"]["grants"] if g["spiffe_id"].startswith("spiffe://dev.local")]
    expected = {p.relative_to(REGO).as_posix() for p in REGO.rglob("*.rego")
                if not p.name.endswith("_test.rego") and "dev" not in p.relative_to(REGO).parts}
    assert {n for n in names if n.endswith(".rego")} == expected


def test_the_sidecar_reads_the_catalog_of_the_same_policy():
    spec = pod_spec("research-agent")
    sidecar = container(spec, "agent-sidecar")
    (catalog_mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "policy"]
    assert catalog_mount["mountPath"] == f"{sidecar_config().policy.dir}/sidecar/catalog/data.yaml"
    assert catalog_mount["subPath"] == "catalog.yaml" and catalog_mount["readOnly"]
    catalog = config_map_files("agents", "agent-policy")["catalog.yaml"]
    assert catalog == (REGO / "sidecar" / "catalog" / "data.yaml").read_bytes()
    assert yaml.safe_load(catalog)["tools"] == json.loads(bundle_members()["data.json"])["sidecar"]["catalog"]["tools"]


def test_deploy_bundle_refuses_without_a_usable_key(tmp_path):
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "not-a-key.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    for key, message in ((ec_key, "an RSA key is needed"),
                         (tmp_path / "missing.pem", "missing.pem: cannot read the signing key: No such file or directory$"),
                         (tmp_path / "not-a-key.pem", "not an unencrypted PEM private key")):
        with pytest.raises(sync_bundle.BuildError, match=message):
            sync_bundle.build(key, out=tmp_path / "out", opa=OPA)
    assert not (tmp_path / "out").exists()
    done = subprocess.run([sys.executable, str(REPO / "deploy" / "sync_bundle.py"), "--signing-key", str(ec_key),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "deploy-bundle: " in done.stderr


def test_deploy_bundle_refuses_a_dev_grant_in_the_shipped_grants(tmp_path):
    rego = tmp_path / "rego"
    shutil.copytree(REGO, rego)
    grants = rego / "sidecar" / "grants" / "data.yaml"
    grants.write_text(grants.read_text() + '\n- spiffe_id: "spiffe://dev.local/*"\n  tools: ["*"]\n')
    with pytest.raises(sync_bundle.BuildError, match="test_shipped_grants_carry_no_dev_grant: FAIL"):
        sync_bundle.build(rsa_key(tmp_path / "k.pem"), rego=rego, out=tmp_path / "out", opa=OPA)
    shutil.rmtree(rego / "sidecar" / "tests")  # the build checks it itself, too
    with pytest.raises(sync_bundle.BuildError, match="belongs in rego/sidecar/dev/"):
        sync_bundle.build(rsa_key(tmp_path / "k.pem"), rego=rego, out=tmp_path / "out", opa=OPA)


def test_deploy_bundle_refuses_a_policy_that_fails_its_tests(tmp_path):
    rego = tmp_path / "rego"
    shutil.copytree(REGO, rego)
    (rego / "sidecar" / "tests" / "broken_test.rego").write_text("package sidecar.tests\n\ntest_broken if false\n")
    with pytest.raises(sync_bundle.BuildError, match="opa test"):
        sync_bundle.build(rsa_key(tmp_path / "k.pem"), rego=rego, out=tmp_path / "out", opa=OPA)


# --- containers agree -----------------------------------------------------------------------------------------


def test_opa_address_bundle_and_probes_agree_with_the_sidecar():
    config = sidecar_config()
    spec = pod_spec("research-agent")
    opa = container(spec, "opa")
    assert re.fullmatch(r"openpolicyagent/opa:\d+\.\d+\.\d+(-static)?", opa["image"]), "OPA is pinned to a release"
    tested = subprocess.run([OPA, "version"], capture_output=True, text=True, check=True).stdout
    assert f"Version: {opa['image'].split(':')[1].removesuffix('-static')}" in tested, "the image runs the OPA the tests run"
    assert flag(opa["args"], "--addr") == config.policy.opa.url
    # OPA's data API on a unix socket whose volume only OPA and the sidecar mount: the agent shares the
    # pod's loopback, so a TCP port would let it read the policy and data and try calls against them
    socket_dir = os.path.dirname(config.policy.opa.url.removeprefix("unix://"))
    mounted = {c["name"] for c in all_containers(spec)
               for m in c.get("volumeMounts", []) if m["mountPath"] == socket_dir}
    assert mounted == {"opa", "agent-sidecar"}
    assert "emptyDir" in volume(spec, mount(opa, "opa-socket")["name"])
    assert flag(opa["args"], "--unix-socket-perm") == "700"
    assert flag(opa["args"], "--bundle") == f"{mount_path(opa, 'policy')}/bundle.tar.gz"
    assert flag(opa["args"], "--verification-key") == f"{mount_path(opa, 'policy-verification')}/bundle.pub.pem"
    assert "--skip-verify" not in " ".join(opa["args"])
    assert volume(spec, "policy")["configMap"]["name"] == "agent-policy"
    assert volume(spec, "policy-verification")["configMap"]["name"] == "agent-policy-verification"
    assert mount(opa, "policy").get("readOnly") and mount(opa, "policy-verification").get("readOnly")
    diagnostic_port = int(flag(opa["args"], "--diagnostic-addr").rsplit(":", 1)[1])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_number(opa, opa[probe]["httpGet"]["port"]) == diagnostic_port
    assert opa["readinessProbe"]["httpGet"]["path"] == "/health?bundles=true"
    assert opa["livenessProbe"]["httpGet"]["path"] == "/health"


def test_sidecar_listeners_probes_and_config_mount_agree():
    config = sidecar_config()
    spec = pod_spec("research-agent")
    sidecar, agent = container(spec, "agent-sidecar"), container(spec, "agent")
    tcp_port = int(config.listen.tcp.rsplit(":", 1)[1])
    assert port_number(sidecar, "grpc") == tcp_port
    assert "mtls" in config.identity.sources, "the TCP port serves mutual TLS only"
    # The kubelet's gRPC probe cannot speak TLS: the probes ask over the unix socket.
    probe = sidecar["startupProbe"]["exec"]["command"]
    assert sidecar["readinessProbe"]["exec"]["command"] == probe
    assert f'"unix:{config.listen.unix}"' in probe[-1]
    assert port_number(sidecar, sidecar["livenessProbe"]["tcpSocket"]["port"]) == tcp_port
    # The config file the sidecar is told to read is the generated ConfigMap's key, where it is mounted.
    config_path = Path(flag(sidecar["args"], "--config"))
    assert str(config_path.parent) == mount_path(sidecar, "sidecar-config")
    assert volume(spec, "sidecar-config")["configMap"]["name"] == "agent-sidecar-config"
    assert config_path.name in generated_config_maps()[("agents", "agent-sidecar-config")]["data"]
    # The unix socket: under the emptyDir both containers mount, where the agent looks for it.
    socket = Path(config.listen.unix)
    assert "emptyDir" in volume(spec, "sidecar-socket")
    assert str(socket.parent) == mount_path(sidecar, "sidecar-socket") == mount_path(agent, "sidecar-socket")
    assert env(agent, "SIDECAR_ADDRESS")["value"] == f"unix:{socket}"


def test_spiffe_workload_api_socket_is_the_csi_mount():
    config = sidecar_config()
    spec = pod_spec("research-agent")
    sidecar = container(spec, "agent-sidecar")
    assert "workload_api" in config.identity.sources
    assert config.identity.workload_api_socket == "", "the socket comes from SPIFFE_ENDPOINT_SOCKET"
    endpoint = env(sidecar, "SPIFFE_ENDPOINT_SOCKET")["value"]
    assert endpoint.startswith("unix:///")
    socket = Path(endpoint[len("unix://") :])
    csi = volume(spec, "spiffe-workload-api")["csi"]
    assert csi == {"driver": "csi.spiffe.io", "readOnly": True}
    assert str(socket.parent) == mount_path(sidecar, "spiffe-workload-api")
    assert mount(sidecar, "spiffe-workload-api").get("readOnly")


def test_writable_paths_are_volumes():
    config = sidecar_config()
    spec = pod_spec("research-agent")
    sidecar = container(spec, "agent-sidecar")
    evidence = Path(config.evidence.dir)
    mounted = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    claims = {t["metadata"]["name"] for t in workload("research-agent")["spec"]["volumeClaimTemplates"]}
    writable = [path for path, m in mounted.items()
                if not m.get("readOnly") and (m["name"] in claims or "emptyDir" in volume(spec, m["name"]))]
    assert any(evidence.is_relative_to(path) for path in writable), "evidence.dir must be on a writable volume"
    assert "/tmp" in writable  # Python's tempfiles on a read-only root


def sidecar_environment(monkeypatch) -> dict[str, str]:
    """The agent-sidecar container's literal env values (PG*, OTEL_*), set in this process as the pod sets them."""
    values = {e["name"]: e["value"] for e in container(pod_spec("research-agent"), "agent-sidecar")["env"] if "value" in e}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def plaintext_opt_ins(section, where: str = "") -> list[str]:
    """Every *allow_plaintext* key of a loaded config that is on, by dotted name."""
    found = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{where}{f.name}"
        if "allow_plaintext" in f.name and value:
            found.append(key)
        elif dataclasses.is_dataclass(value):
            found += plaintext_opt_ins(value, f"{key}.")
        elif isinstance(value, dict):
            found += [hit for k, v in value.items() if dataclasses.is_dataclass(v) for hit in plaintext_opt_ins(v, f"{key}.{k}.")]
    return found


def test_the_sidecar_config_opts_into_no_plaintext_hop(monkeypatch):
    """The example is secure as given: no allow_plaintext anywhere, and the PG* variables the StatefulSet sets
    pass the sidecar's own check (a PostgreSQL off the pod only with sslmode verify-ca/verify-full)."""
    variables = sidecar_environment(monkeypatch)
    config = sidecar_config()
    assert plaintext_opt_ins(config) == []
    assert "allow_plaintext" not in (K8S / "agent" / "sidecar.yaml").read_text()
    assert config.escalation.store == config.usage.store == "postgres" and config.escalation.dsn == config.usage.dsn == ""
    assert variables["PGSSLMODE"] == "verify-full"
    # The check is live: the same variables with a non-verifying sslmode are refused, for both stores.
    monkeypatch.setenv("PGSSLMODE", "require")
    with pytest.raises(ConfigError, match=r"usage.dsn \(the PG\* variables\): .* PostgreSQL at agent-postgres"):
        sidecar_config()
    with pytest.raises(ConfigError, match=r"escalation.dsn \(the PG\* variables\): .* PostgreSQL at agent-postgres"):
        load_config(K8S / "agent" / "sidecar.yaml", {"usage.store": "memory"})


# --- TLS: SVIDs as files, written by spiffe-helper, for each hop's both ends -----------------------------------

# spiffe-helper's configuration keys (cmd/spiffe-helper/config/config.go; it refuses unknown ones).
SPIFFE_HELPER_KEYS = {
    "agent_address", "cmd", "cmd_args", "pid_file_name", "cert_dir", "cert_file_mode", "key_file_mode",
    "jwt_bundle_file_mode", "jwt_svid_file_mode", "include_federated_domains", "renew_signal", "daemon_mode",
    "svid_file_name", "svid_key_file_name", "svid_bundle_file_name", "jwt_svids", "jwt_bundle_file_name",
    "add_intermediates_to_bundle", "hint", "health_checks",
}
SPIFFE_HELPER_HEALTH_KEYS = {"listener_enabled", "bind_port", "liveness_path", "readiness_path"}


def spiffe_helper_config(text: str) -> dict:
    """The HCL subset the example's helper.conf files use: `key = "string" | number | true/false | [...]`,
    one `health_checks { ... }` block, # comments. Anything else, or an unknown key, fails."""
    config: dict = {}
    block: dict | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line == "}" and block is not None:
            block = None
            continue
        opened = re.fullmatch(r"(\w+) \{", line)
        if opened and block is None:
            assert opened.group(1) == "health_checks", f"line {number}: unknown block {opened.group(1)}"
            block = config.setdefault("health_checks", {})
            continue
        match = re.fullmatch(r"(\w+)\s*=\s*(.+)", line)
        assert match, f"line {number}: not key = value: {raw!r}"
        key, value = match.groups()
        known = SPIFFE_HELPER_HEALTH_KEYS if block is not None else SPIFFE_HELPER_KEYS
        assert key in known, f"line {number}: spiffe-helper has no key {key!r}"
        if value in ("true", "false"):
            parsed = value == "true"
        elif re.fullmatch(r"\d+", value):
            parsed = int(value)
        elif re.fullmatch(r'"[^"]*"', value):
            parsed = value[1:-1]
        else:
            parsed = value  # a list (jwt_svids): kept as text
        (block if block is not None else config)[key] = parsed
    assert block is None, "unclosed block"
    return config


# pod, spiffe-helper's ConfigMap, the emptyDir it writes, the container that uses the files
TLS_PODS = [
    ("research-agent", ("agents", "agent-sidecar-spiffe-helper"), "sidecar-svid", "agent-sidecar"),
    ("agent-postgres", ("agents", "agent-postgres-spiffe-helper"), "postgres-svid", "postgres"),
    ("otel-collector", ("observability", "otel-collector-spiffe-helper"), "collector-svid", "otel-collector"),
]


def svid_files(pod: str) -> dict[str, str]:
    """{"svid", "key", "bundle"}: where spiffe-helper writes them, as the consumer container sees them."""
    spec = pod_spec(pod)
    _, config_map, svid_volume, consumer = next(entry for entry in TLS_PODS if entry[0] == pod)
    helper = spiffe_helper_config(config_map_files(*config_map)["helper.conf"].decode())
    assert helper["cert_dir"] == mount_path(container(spec, "spiffe-helper"), svid_volume)
    directory = mount_path(container(spec, consumer), svid_volume)
    return {"svid": f"{directory}/{helper['svid_file_name']}", "key": f"{directory}/{helper['svid_key_file_name']}",
            "bundle": f"{directory}/{helper['svid_bundle_file_name']}"}


@pytest.mark.parametrize("pod, config_map, svid_volume, consumer", TLS_PODS)
def test_spiffe_helper_writes_each_pods_svid_before_its_user_starts(pod, config_map, svid_volume, consumer):
    spec = pod_spec(pod)
    helper = container(spec, "spiffe-helper")
    config = spiffe_helper_config(config_map_files(*config_map)["helper.conf"].decode())
    assert config["daemon_mode"] is True, "one-shot files would expire with the SVID"
    assert {"svid_file_name", "svid_key_file_name", "svid_bundle_file_name"} <= set(config)
    assert "key_file_mode" not in config, "the default 0600: PostgreSQL and libpq refuse a key others can read"
    # The Workload API: the CSI driver's socket, where the helper mounts it.
    socket = Path(config["agent_address"])
    assert str(socket.parent) == mount_path(helper, "spiffe-workload-api")
    assert volume(spec, "spiffe-workload-api")["csi"] == {"driver": "csi.spiffe.io", "readOnly": True}
    configured = Path(flag(helper["args"], "-config"))
    assert str(configured.parent) == mount_path(helper, "spiffe-helper-config")
    assert volume(spec, "spiffe-helper-config")["configMap"]["name"] == config_map[1]
    assert config_map_files(*config_map).keys() == {configured.name}
    # A native sidecar, started before the container that reads the files; started = the files are written.
    order = [c["name"] for c in all_containers(spec)]
    assert helper["restartPolicy"] == "Always" and order.index("spiffe-helper") < order.index(consumer)
    health = config["health_checks"]
    assert health["listener_enabled"] is True
    assert helper["startupProbe"]["httpGet"]["path"] == health["readiness_path"]
    assert port_number(helper, helper["startupProbe"]["httpGet"]["port"]) == health["bind_port"]
    assert helper["livenessProbe"]["httpGet"]["path"] == health["liveness_path"]
    # The key is in memory, and only the helper and the container that uses it mount it.
    assert volume(spec, svid_volume)["emptyDir"]["medium"] == "Memory"
    assert {c["name"] for c in all_containers(spec) if any(m["name"] == svid_volume for m in c.get("volumeMounts", []))} \
        >= {"spiffe-helper", consumer}
    readers = {c["name"] for c in all_containers(spec)
               if any(m["name"] == svid_volume for m in c.get("volumeMounts", [])) and c["name"] != "spiffe-helper"}
    assert all(mount(container(spec, name), svid_volume).get("readOnly") for name in readers)
    if pod == "research-agent":
        assert readers == {"agent-sidecar"}, "the agent must not read the pod's SVID key"


def rendered_registration(name: str) -> tuple[str, list[str], dict]:
    """(SPIFFE ID, DNS names, the selected workload) of a ClusterSPIFFEID, as the controller manager renders it."""
    registration = find("ClusterSPIFFEID", name)["spec"]
    selected = [d for d in deployments()
                if registration["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": d["metadata"]["namespace"]}
                and registration["podSelector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert len(selected) == 1, f"ClusterSPIFFEID {name} selects {len(selected)} workloads"
    (workload_,) = selected
    account = workload_["spec"]["template"]["spec"]["serviceAccountName"]
    assert find("ServiceAccount", account)["metadata"]["namespace"] == workload_["metadata"]["namespace"]
    spiffe_id = (registration["spiffeIDTemplate"].replace("{{ .TrustDomain }}", "example.org")
                 .replace("{{ .PodMeta.Namespace }}", workload_["metadata"]["namespace"])
                 .replace("{{ .PodSpec.ServiceAccountName }}", account))
    dns = registration.get("dnsNameTemplates", [])
    assert "{{" not in spiffe_id and not any("{{" in d for d in dns), "only the templates rendered here"
    return spiffe_id, dns, workload_


def test_postgres_serves_tls_only_with_an_svid_naming_the_host_the_sidecars_dial(monkeypatch):
    variables = sidecar_environment(monkeypatch)
    _, dns, selected = rendered_registration("agent-postgres")
    assert selected["metadata"]["name"] == "agent-postgres"
    assert variables["PGHOST"] in dns, "verify-full checks PGHOST against the SVID's DNS names"
    # The sidecar: verify-full against the trust bundle, the pod's SVID as its client certificate.
    files = svid_files("research-agent")
    assert (variables["PGSSLROOTCERT"], variables["PGSSLCERT"], variables["PGSSLKEY"]) == (
        files["bundle"], files["svid"], files["key"])
    # The server: ssl on with its SVID, client certificates checked against the bundle, and pg_hba.conf from its ConfigMap.
    spec = pod_spec("agent-postgres")
    postgres = container(spec, "postgres")
    settings = dict(value.split("=", 1) for flag_, value in zip(postgres["args"][::2], postgres["args"][1::2]) if flag_ == "-c")
    assert len(settings) * 2 == len(postgres["args"]), postgres["args"]
    server = svid_files("agent-postgres")
    assert settings["ssl"] == "on"
    assert (settings["ssl_cert_file"], settings["ssl_key_file"], settings["ssl_ca_file"]) == (
        server["svid"], server["key"], server["bundle"])
    hba = Path(settings["hba_file"])
    assert str(hba.parent) == mount_path(postgres, "hba")
    assert volume(spec, "hba")["configMap"]["name"] == "agent-postgres-hba"
    assert config_map_files("agents", "agent-postgres-hba").keys() == {hba.name}
    # The probe asks on the unix socket (TCP needs a client certificate).
    probe = postgres["readinessProbe"]["exec"]["command"]
    assert flag(probe, "-h") == mount_path(postgres, "run")


def hba_rules(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_pg_hba_admits_the_network_only_over_tls_with_a_client_certificate():
    rules = hba_rules(config_map_files("agents", "agent-postgres-hba")["pg_hba.conf"].decode())
    assert rules, "an empty pg_hba.conf refuses everyone"
    for rule in rules:
        kind = rule[0]
        assert kind in ("local", "hostssl"), f"{rule}: host and hostnossl admit plaintext over the network"
        assert "trust" not in rule and "password" not in rule, rule  # a password, and never in clear
        if kind == "hostssl":
            database, user, method, *options = rule[1:3] + rule[4:]
            assert (database, user) == ("sidecar", "sidecar"), rule
            assert method == "scram-sha-256", rule
            assert any(o in ("clientcert=verify-ca", "clientcert=verify-full") for o in options), rule
    variables = {e["name"]: e for e in container(pod_spec("agent-postgres"), "postgres")["env"]}
    assert variables["POSTGRES_DB"]["value"] == variables["POSTGRES_USER"]["value"] == "sidecar"


def test_postgres_reloads_its_certificate_after_spiffe_helper_rewrites_it():
    """PostgreSQL reads ssl_cert_file & co. only at start and on reload: ssl-reload runs pg_ctl reload, which
    finds the postmaster in postmaster.pid and signals it across containers (shared process namespace)."""
    spec = pod_spec("agent-postgres")
    reload_ = container(spec, "ssl-reload")
    postgres = container(spec, "postgres")
    assert spec["shareProcessNamespace"] is True
    assert reload_["image"] == postgres["image"], "the same pg_ctl as the server"
    script = reload_["args"][0]
    directory = re.search(r"^dir=(\S+)$", script, re.M).group(1)
    assert directory == mount_path(reload_, "postgres-svid") == mount_path(postgres, "postgres-svid")
    files = svid_files("agent-postgres")
    for path in files.values():  # all three: a reload needs the certificate, the key and the CA consistent
        assert f'"$dir/{Path(path).relative_to(directory)}"' in script, path
    data = env(postgres, "PGDATA")["value"]
    assert env(reload_, "PGDATA")["value"] == data
    assert Path(data).is_relative_to(mount_path(reload_, "data")) and mount(reload_, "data").get("readOnly")
    # The same user as the server: a signal to another user's process is refused without CAP_KILL.
    assert "runAsUser" not in reload_.get("securityContext", {}) and "runAsUser" not in postgres.get("securityContext", {})


def test_otlp_goes_sidecar_to_collector_to_jaeger(monkeypatch):
    variables = sidecar_environment(monkeypatch)
    config = sidecar_config()
    endpoint = urlsplit(config.telemetry.endpoint)
    assert config.telemetry.protocol == "grpc" and endpoint.scheme == "https"
    assert not config.telemetry.allow_plaintext
    _, collector, collector_port = service_target(endpoint.hostname, endpoint.port)
    collector_config = yaml.safe_load((K8S / "observability" / "collector.yaml").read_text())
    receiver = collector_config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert int(receiver.rsplit(":", 1)[1]) == collector_port
    config_file = Path(flag(collector["args"], "--config"))
    collector_spec = pod_spec("otel-collector")
    assert str(config_file.parent) == mount_path(collector, "config")
    assert volume(collector_spec, "config")["configMap"]["name"] == "otel-collector-config"
    assert config_file.name in generated_config_maps()[("observability", "otel-collector-config")]["data"]
    pipeline = collector_config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter_name,) = pipeline["exporters"]
    exporter = collector_config["exporters"][exporter_name]
    assert exporter_name.split("/")[0] == "otlp"
    host, port = exporter["endpoint"].rsplit(":", 1)
    _, jaeger, jaeger_port = service_target(host, int(port))
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    assert jaeger_port == 4317
    query, _, ui_port = service_target("jaeger-query.observability.svc", 16686)
    assert ui_port == 16686 and query["spec"].get("type", "ClusterIP") == "ClusterIP"
    # Mutual TLS: the collector's SVID names the endpoint's host; each end checks the other against the bundle.
    _, dns, selected = rendered_registration("otel-collector")
    assert selected["metadata"]["name"] == "otel-collector" and endpoint.hostname in dns
    sidecar_files = svid_files("research-agent")
    assert (variables["OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"], variables["OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE"],
            variables["OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY"]) == (
        sidecar_files["bundle"], sidecar_files["svid"], sidecar_files["key"])
    server_files = svid_files("otel-collector")
    for protocol, receiver_config in collector_config["receivers"]["otlp"]["protocols"].items():
        tls = receiver_config.get("tls")
        assert tls, f"the {protocol} receiver serves plaintext"
        assert (tls["cert_file"], tls["key_file"], tls["client_ca_file"]) == (
            server_files["svid"], server_files["key"], server_files["bundle"]), protocol
        assert tls["client_ca_file_reload"] is True and tls["reload_interval"], "the SVID is rewritten hourly"
        assert not tls.get("insecure") and not tls.get("include_system_ca_certs_pool"), protocol


def test_the_demo_agent_runs_from_its_config_map_with_the_image_python():
    spec = pod_spec("research-agent")
    agent = container(spec, "agent")
    python, script = agent["command"]
    assert python == "/opt/agent-sidecar/bin/python"  # the venv the Dockerfile installs into
    assert str(Path(script).parent) == mount_path(agent, "demo-agent")
    assert Path(script).name in generated_config_maps()[("agents", "demo-agent")]["data"]


# --- security, resources, order ----------------------------------------------------------------------------


def deployments() -> list[dict]:
    """Every Deployment and StatefulSet."""
    return [d for _, d in resource_documents() if d["kind"] in WORKLOAD_KINDS]


@pytest.mark.parametrize("deployment", [d["metadata"]["name"] for _, d in resource_documents() if d["kind"] in WORKLOAD_KINDS])
def test_every_container_is_locked_down_and_bounded(deployment):
    spec = pod_spec(deployment)
    pod_security = spec.get("securityContext", {})
    assert pod_security.get("runAsNonRoot") is True and pod_security.get("runAsUser", 0) > 0
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    for c in all_containers(spec):
        where = f"{deployment}/{c['name']}"
        security = c.get("securityContext", {})
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: resources.{kind}"
        image = c["image"]
        assert re.search(r"(:v?\d+\.\d+(\.\d+)?[-\w.]*|@sha256:[0-9a-f]{64})$", image), f"{where}: {image} is not pinned"


def test_the_sidecar_gets_pod_name_and_namespace_from_the_downward_api():
    spec = pod_spec("research-agent")
    for name in ("agent-sidecar", "agent"):
        c = container(spec, name)
        assert env(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_start_order_opa_then_sidecar_then_agent():
    spec = pod_spec("research-agent")
    assert [c["name"] for c in spec["initContainers"]] == ["opa", "spiffe-helper", "agent-sidecar"]
    for name in ("opa", "spiffe-helper", "agent-sidecar"):  # native sidecars: up before the agent, down after it
        c = container(spec, name)
        assert c["restartPolicy"] == "Always" and "startupProbe" in c
    assert [c["name"] for c in spec["containers"]] == ["agent"]
    assert find("NetworkPolicy", "research-agent-deny-ingress")["spec"]["podSelector"]["matchLabels"].items() <= (
        workload("research-agent")["spec"]["template"]["metadata"]["labels"].items()
    )


# --- egress: the agent pods reach only what the sidecar needs ----------------------------------------

EGRESS = ("NetworkPolicy", "research-agent-egress")


def namespace_labels(name: str) -> dict:
    """A namespace's labels as the cluster sets them (kubernetes.io/metadata.name is automatic)."""
    declared = [d for _, d in resource_documents() if d["kind"] == "Namespace" and d["metadata"]["name"] == name]
    labels = declared[0]["metadata"].get("labels", {}) if declared else {}
    return {**labels, "kubernetes.io/metadata.name": name}


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is evaluated here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def egress_allows(policy: dict, namespace: str, pod_labels: dict, port: int, protocol: str = "TCP") -> bool:
    """Whether one egress NetworkPolicy lets its pods open `protocol`/`port` to a pod (networking.k8s.io/v1 rules)."""
    own = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports")
        if ports is not None and not any(p["port"] == port and p.get("protocol", "TCP") == protocol for p in ports):
            continue
        if not rule.get("to"):
            return True  # no `to`: every destination
        for peer in rule["to"]:
            if "ipBlock" in peer:
                continue  # pods are not matched by address here; the policy must not have any (asserted below)
            if "namespaceSelector" in peer:
                in_namespace = selects(peer["namespaceSelector"], namespace_labels(namespace))
            else:
                in_namespace = namespace == own
            if in_namespace and selects(peer.get("podSelector", {}), pod_labels):
                return True
    return False


def service_pod(host: str, port: int) -> tuple[str, dict, int]:
    """(namespace, pod labels, container port) behind a <service>.<namespace>.svc name, as the policy sees them."""
    service, _, container_port = service_target(host, port)
    namespace = service["metadata"]["namespace"]
    selector = service["spec"]["selector"]
    (labels,) = [
        d["spec"]["template"]["metadata"]["labels"] for _, d in resource_documents()
        if d["kind"] in WORKLOAD_KINDS and d["metadata"]["namespace"] == namespace
        and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    return namespace, labels, container_port


KUBE_DNS = ("kube-system", {"k8s-app": "kube-dns"})  # the label kubeadm, kOps, EKS, GKE and AKS give CoreDNS/kube-dns
TOOLS_NAMESPACE = "agent-tools"


def needed_peers() -> list[tuple[str, str, dict, int, str]]:
    """(what, namespace, pod labels, port, protocol) for every connection the example pod's sidecar makes."""
    config = sidecar_config()
    sidecar = container(pod_spec("research-agent"), "agent-sidecar")
    needs = [("dns", *KUBE_DNS, 53, "UDP"), ("dns", *KUBE_DNS, 53, "TCP")]
    pg_host, pg_port = env(sidecar, "PGHOST")["value"], int(env(sidecar, "PGPORT")["value"])
    needs.append(("postgres", *service_pod(pg_host, pg_port), "TCP"))
    endpoint = urlsplit(config.telemetry.endpoint)
    needs.append(("collector", *service_pod(endpoint.hostname, endpoint.port), "TCP"))
    # Tools: whatever mcp.upstreams / invoke.tools name must be a Service in the tools' namespace.
    tool_urls = [u.url for u in config.mcp.upstreams.values() if u.url] + [t.url for t in config.invoke.tools.values()]
    for url in tool_urls:
        parts = urlsplit(url)
        match = re.fullmatch(r"[a-z0-9-]+\.([a-z0-9-]+)\.svc(\.cluster\.local)?", parts.hostname)
        assert match and match.group(1) == TOOLS_NAMESPACE, f"{url}: tools are Services in {TOOLS_NAMESPACE}"
        needs.append(("tool", TOOLS_NAMESPACE, {}, parts.port or {"http": 80, "https": 443}[parts.scheme], "TCP"))
    return needs


def test_egress_policy_selects_the_agent_pods_and_denies_by_default():
    policy = find(*EGRESS)
    agent_labels = workload("research-agent")["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], agent_labels)
    assert policy["metadata"]["namespace"] == workload("research-agent")["metadata"]["namespace"]
    # Listing Egress makes everything not allowed below denied.
    assert "Egress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"]["egress"]:
        # A rule without `to` (or with an empty one) allows every destination; without `ports`, every port.
        assert rule.get("to") and rule.get("ports"), rule
        assert not any("ipBlock" in peer for peer in rule["to"]), rule
        for peer in rule["to"]:
            # An empty namespaceSelector is every namespace.
            assert peer.get("namespaceSelector", {"matchLabels": {"x": "own"}}).get("matchLabels"), peer


def test_in_pod_peers_need_no_egress_rule():
    """OPA and the SPIFFE Workload API are reached inside the pod: loopback and a unix socket."""
    config = sidecar_config()
    assert config.policy.opa.url.startswith("unix:///")
    assert env(container(pod_spec("research-agent"), "agent-sidecar"), "SPIFFE_ENDPOINT_SOCKET")["value"].startswith("unix://")
    assert pod_spec("research-agent")["automountServiceAccountToken"] is False  # no Kubernetes API either


def test_egress_allows_each_peer_the_sidecar_needs():
    policy = find(*EGRESS)
    needs = needed_peers()
    assert {what for what, *_ in needs} >= {"dns", "postgres", "collector"}
    for what, namespace, labels, port, protocol in needs:
        assert egress_allows(policy, namespace, labels, port, protocol), f"{what}: {namespace} {labels} {protocol}/{port}"
    # The tools' namespace exists, and any of its pods is reachable on the tool ports only.
    assert any(d["kind"] == "Namespace" and d["metadata"]["name"] == TOOLS_NAMESPACE for _, d in resource_documents())
    assert egress_allows(policy, TOOLS_NAMESPACE, {"app": "docs-mcp"}, 8000)
    assert not egress_allows(policy, TOOLS_NAMESPACE, {"app": "docs-mcp"}, 22)


def test_egress_allows_nothing_else():
    policy = find(*EGRESS)
    (_, _, postgres, pg_port, _), = [need for need in needed_peers() if need[0] == "postgres"]
    jaeger = service_pod("jaeger-collector.observability.svc", 4317)
    console = workload("approvals-console")
    refused = [
        ("jaeger directly", jaeger[0], jaeger[1], jaeger[2], "TCP"),  # same port as the collector, another pod
        ("the console", "approvals", console["spec"]["template"]["metadata"]["labels"], 8080, "TCP"),
        ("another agent pod", "agents", {"app.kubernetes.io/name": "research-agent"}, 50051, "TCP"),
        ("postgres on another port", "agents", postgres, pg_port + 1, "TCP"),
        ("postgres from another namespace", "default", postgres, pg_port, "TCP"),
        ("another kube-system pod", "kube-system", {"k8s-app": "metrics-server"}, 53, "UDP"),
        ("dns in another namespace", "default", KUBE_DNS[1], 53, "UDP"),
        ("the collector over HTTP", "observability", {"app.kubernetes.io/name": "otel-collector"}, 4318, "TCP"),
        ("a tool over UDP", TOOLS_NAMESPACE, {}, 8000, "UDP"),
    ]
    for what, namespace, labels, port, protocol in refused:
        assert not egress_allows(policy, namespace, labels, port, protocol), what
    # Every rule is there for a need: no peer is named that the pod does not use.
    needs = needed_peers() + [("tool", TOOLS_NAMESPACE, {}, p, "TCP") for p in (8000, 8443)]
    for rule in policy["spec"]["egress"]:
        alone = {**policy, "spec": {**policy["spec"], "egress": [rule]}}
        assert any(egress_allows(alone, ns, labels, port, proto) for _, ns, labels, port, proto in needs), rule


def test_egress_policy_evaluation_is_not_vacuous():
    """The evaluator above refuses what a deny-all policy refuses and allows what an allow-all rule allows."""
    policy = find(*EGRESS)
    deny_all = {**policy, "spec": {**policy["spec"], "egress": []}}
    allow_all = {**policy, "spec": {**policy["spec"], "egress": [{}]}}
    for _, namespace, labels, port, protocol in needed_peers():
        assert not egress_allows(deny_all, namespace, labels, port, protocol)
        assert egress_allows(allow_all, namespace, labels, port, protocol)


def test_every_config_map_volume_is_generated_in_the_same_namespace():
    generated = generated_config_maps()
    for deployment in deployments():
        namespace = deployment["metadata"]["namespace"]
        for v in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in v:
                assert (namespace, v["configMap"]["name"]) in generated, v


# --- the demo agent, against a real sidecar run from the example's config --------------------------------------


async def test_the_demo_agent_talks_to_a_sidecar_run_from_the_example_config(running_sidecar, tmp_path):
    socket_dir = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    catalog_dir = tmp_path / "policy" / "sidecar" / "catalog"  # the sidecar's subPath mount
    catalog_dir.mkdir(parents=True)
    (catalog_dir / "data.yaml").write_bytes(config_map_files("agents", "agent-policy")["catalog.yaml"])
    try:
        with opa_serving(pod_opa_command(tmp_path / "pod")) as opa_url:
            overrides = {  # what differs on a laptop: no SPIRE, no collector, paths, OPA's port
                "listen.tcp": "127.0.0.1:0",
                "listen.unix": str(socket_dir / "sidecar.sock"),
                "policy.dir": str(tmp_path / "policy"),
                "policy.opa": {"url": opa_url},
                "escalation.store": "sqlite",  # the shared PostgreSQL: tests/test_deploy_loop.py
                "escalation.path": str(tmp_path / "escalations.db"),
                "usage.store": "memory",
                "identity.sources": ["dev"],
                "identity.dev_spiffe_id": RESEARCH_AGENT,
                "evidence.dir": str(tmp_path / "evidence"),
                "telemetry.exporter": "none",
            }
            config = load_config(K8S / "agent" / "sidecar.yaml", overrides)
            assert {f.name for f in dataclasses.fields(config)} >= {"evidence", "telemetry"}
            await running_sidecar(config)
            environment = {**os.environ, "SIDECAR_ADDRESS": f"unix:{socket_dir / 'sidecar.sock'}", "PYTHONPATH": str(REPO)}
            # A child process, awaited: the sidecar serves on this test's event loop.
            child = await asyncio.create_subprocess_exec(
                sys.executable, str(K8S / "agent" / "demo_agent.py"), "--once",
                env=environment, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(child.communicate(), timeout=60)
            assert child.returncode == 0, (stdout + stderr).decode()
            lines = [yaml.safe_load(line) for line in stdout.decode().splitlines()]
            assert len(lines) == 6 and all(line.get("outcome") in ("allow", "deny", "escalate") for line in lines)
            # The example shows every outcome: a granted call whose risk score escalates to a person.
            (ticket,) = [line for line in lines if line["tool"] == "create_ticket"]
            assert ticket["outcome"] == "escalate" and ticket["escalation_id"], ticket
            # Decided by the pod's OPA on the signed bundle: the research agent's grant allows search_docs.
            (search,) = [line for line in lines if line["tool"] == "search_docs"]
            assert search["outcome"] == "allow", search
            revision = json.loads(bundle_members()[".manifest"])["revision"]
            assert all(line.get("policy_revision") == revision for line in lines), lines
    finally:
        for leftover in socket_dir.iterdir():
            leftover.unlink()
        socket_dir.rmdir()
