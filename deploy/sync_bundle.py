"""Build the signed OPA bundle the Kubernetes example serves, from rego/.

    make deploy-bundle SIGNING_KEY=path/to/bundle-signing.pem
    python deploy/sync_bundle.py --signing-key KEY [--out DIR] [--opa OPA]

Writes into deploy/k8s/policy/ (never committed; see its .gitignore), the
files of the ConfigMap `agent-policy` (deploy/k8s/kustomization.yaml):

    bundle.tar.gz    `opa build` of the production part of rego/, signed with
                     --signing-key (RS256; .signatures.json inside); the OPA
                     container verifies it with --verification-key
    bundle.pub.pem   the public key of KEY, for that verification
    catalog.yaml     rego/sidecar/catalog/data.yaml, the tool catalog the
                     sidecar reads (policy.dir)

The production part leaves out the dev grants (rego/sidecar/dev/, for the
dev identity of `make run`) and the tests (*_test.rego), so the pod's OPA
serves no dev grant. Before building, the whole of rego/ must pass
`opa check --strict` and `opa test`, and the staged bundle `opa check
--strict` on its own. KEY is an RSA private key in PEM; keep it out of the
repository (docs/deploy.md says how to make one).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

REPO = Path(__file__).resolve().parent.parent
REGO = REPO / "rego"
OUT = REPO / "deploy" / "k8s" / "policy"
DEFAULT_OPA = REPO / ".tools" / "bin" / "opa"

BUNDLE = "bundle.tar.gz"
PUBLIC_KEY = "bundle.pub.pem"
CATALOG = "catalog.yaml"
CATALOG_SOURCE = Path("sidecar") / "catalog" / "data.yaml"
# Parts of rego/ that never go into the production bundle.
DEV_DIRECTORY = Path("sidecar") / "dev"
TEST_SUFFIX = "_test.rego"
DEV_TRUST_DOMAIN = "spiffe://dev.local"
LOADED = (".rego", ".json", ".yaml", ".yml")


class BuildError(Exception):
    """The bundle was not built; the message says why."""


def production_files(rego: Path) -> list[Path]:
    """Files of the production bundle, relative to rego/: .manifest, policies and data,
    without hidden paths, dev/ or tests."""
    found = []
    for path in rego.rglob("*"):
        rel = path.relative_to(rego)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts[:-1]):
            continue
        if rel.is_relative_to(DEV_DIRECTORY) or rel.name.endswith(TEST_SUFFIX):
            continue
        if rel.name == ".manifest" or rel.suffix in LOADED:
            found.append(rel)
    return sorted(found)


def revision(stage: Path, files: list[Path]) -> str:
    """sha256:<16 hex> over the staged files' paths and bytes (the bundle's .manifest revision)."""
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.as_posix().encode() + b"\0" + (stage / rel).read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()[:16]


def public_key_pem(signing_key: Path) -> bytes:
    """The PEM public key of an RSA private key (BuildError for anything else)."""
    try:
        data = signing_key.read_bytes()
    except OSError as exc:
        raise BuildError(f"{signing_key}: cannot read the signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BuildError(f"{signing_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BuildError(f"{signing_key}: an RSA key is needed (the pod's OPA verifies RS256)")
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _opa(opa: str, *args: str, cwd: Path | None = None) -> None:
    done = subprocess.run([opa, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise BuildError(f"opa {' '.join(args)} failed:\n{(done.stdout + done.stderr).strip()}")


def build(signing_key: Path, *, rego: Path = REGO, out: Path = OUT, opa: str = str(DEFAULT_OPA)) -> str:
    """Check rego/, then write bundle.tar.gz (signed), bundle.pub.pem and catalog.yaml into out.

    Returns the bundle's revision. Raises BuildError (nothing in out changed)
    when the key is unusable, the policy fails its checks or tests, or the
    shipped grants name the dev trust domain.
    """
    public = public_key_pem(signing_key)
    _opa(opa, "check", "--strict", str(rego))
    _opa(opa, "test", str(rego))
    files = production_files(rego)
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        stage = Path(tmp) / "stage"
        for rel in files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rego / rel, stage / rel)
        _refuse_dev_grants(stage, files)
        _opa(opa, "check", "--strict", str(stage))
        rev = revision(stage, files)
        built = Path(tmp) / BUNDLE
        _opa(opa, "build", "--bundle", ".", "--signing-key", str(signing_key.resolve()),
             "--revision", rev, "--output", str(built), cwd=stage)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, out / BUNDLE)
    (out / PUBLIC_KEY).write_bytes(public)
    shutil.copyfile(rego / CATALOG_SOURCE, out / CATALOG)
    return rev


def _refuse_dev_grants(stage: Path, files: list[Path]) -> None:
    """No grant for the dev identity's trust domain in the shipped grants (it belongs in dev/)."""
    for rel in files:
        if rel.parent == Path("sidecar") / "grants" and rel.suffix in (".yaml", ".yml", ".json"):
            for grant in yaml.safe_load((stage / rel).read_text()) or []:
                if str(grant.get("spiffe_id", "")).startswith(DEV_TRUST_DOMAIN):
                    raise BuildError(f"rego/{rel}: a grant for {grant['spiffe_id']} belongs in rego/{DEV_DIRECTORY}/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signing-key", required=True, type=Path, metavar="PEM", help="RSA private key (PEM) that signs the bundle")
    parser.add_argument("--out", type=Path, default=OUT, metavar="DIR", help=f"output directory (default {OUT.relative_to(REPO)})")
    parser.add_argument("--opa", default=str(DEFAULT_OPA), metavar="BINARY", help="the opa binary (default .tools/bin/opa)")
    args = parser.parse_args(argv)
    try:
        rev = build(args.signing_key, out=args.out, opa=args.opa)
    except BuildError as exc:
        print(f"deploy-bundle: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {BUNDLE} (revision {rev}, signed), {PUBLIC_KEY}, {CATALOG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
