"""Copy the policy bundle rego/ into deploy/k8s/policy/ and list it in the kustomization.

    make deploy-bundle          (or: python deploy/sync_bundle.py [--check])

kustomize cannot read ../../rego under its default load restrictions, so the
bundle the cluster gets is a copy kept beside the manifests. The
configMapGenerator `agent-policy` in deploy/k8s/kustomization.yaml lists every
file, keyed by its path with "/" written as "__" (ConfigMap keys are flat);
the pod's `policy-bundle` init container turns the keys back into the tree.
The lines between the BEGIN/END markers are written by this script.

tests/test_deploy_k8s.py fails, naming this command, when the copy or the
list no longer matches rego/.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGO = REPO / "rego"
K8S = REPO / "deploy" / "k8s"
COPY = K8S / "policy"
KUSTOMIZATION = K8S / "kustomization.yaml"
BEGIN = "# BEGIN policy bundle (written by `make deploy-bundle`; do not edit)"
END = "# END policy bundle"
SEPARATOR = "__"
_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def bundle_files(root: Path) -> list[str]:
    """Every file of the bundle directory, relative, "/"-separated; hidden directories are skipped."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts[:-1]):
            found.append(rel.as_posix())
    return sorted(found)


def config_map_key(rel: str) -> str:
    parts = rel.split("/")
    if any(SEPARATOR in part for part in parts):
        raise ValueError(f"{rel}: a bundle path must not contain {SEPARATOR!r} (it separates directories in keys)")
    key = SEPARATOR.join(parts)
    if not _KEY.match(key) or len(key) > 253:
        raise ValueError(f"{rel}: {key!r} is not a valid ConfigMap key")
    return key


def generator_lines(files: list[str], indent: str) -> list[str]:
    return [f"{indent}- {config_map_key(rel)}=policy/{rel}" for rel in files]


def rewrite_block(text: str, files: list[str]) -> str:
    lines = text.splitlines()
    try:
        begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
        end = next(i for i, line in enumerate(lines) if i > begin and line.strip() == END)
    except StopIteration:
        raise SystemExit(f"{KUSTOMIZATION}: the {BEGIN!r} / {END!r} markers are missing") from None
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    return "\n".join([*lines[: begin + 1], *generator_lines(files, indent), *lines[end:]]) + "\n"


def out_of_sync() -> list[str]:
    """What differs between rego/ and the copy + generator list ([] when in sync)."""
    problems = []
    source, copy = bundle_files(REGO), bundle_files(COPY) if COPY.is_dir() else []
    for rel in sorted(set(source) - set(copy)):
        problems.append(f"missing from deploy/k8s/policy: {rel}")
    for rel in sorted(set(copy) - set(source)):
        problems.append(f"not in rego/ any more: deploy/k8s/policy/{rel}")
    for rel in sorted(set(source) & set(copy)):
        if (REGO / rel).read_bytes() != (COPY / rel).read_bytes():
            problems.append(f"differs from rego/: deploy/k8s/policy/{rel}")
    text = KUSTOMIZATION.read_text()
    if rewrite_block(text, source) != text:
        problems.append("the agent-policy configMapGenerator in deploy/k8s/kustomization.yaml does not list rego/ exactly")
    return problems


def sync() -> None:
    source = bundle_files(REGO)
    for rel in source:
        config_map_key(rel)  # refuse before touching anything
    if COPY.exists():
        shutil.rmtree(COPY)
    for rel in source:
        target = COPY / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REGO / rel, target)
    KUSTOMIZATION.write_text(rewrite_block(KUSTOMIZATION.read_text(), source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        problems = out_of_sync()
        for problem in problems:
            print(problem)
        if problems:
            print("run `make deploy-bundle` to copy rego/ into deploy/k8s/policy/")
        return 1 if problems else 0
    sync()
    print(f"deploy/k8s/policy: {len(bundle_files(COPY))} files from rego/ (ConfigMap agent-policy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
