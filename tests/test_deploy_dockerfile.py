"""The sidecar image's Dockerfile, checked statically (no docker engine runs on these machines).

What can be checked without building: the base images are pinned, the image
runs as the non-root user the pod expects, its entrypoint and config path are
the ones the manifests use, every COPY source exists and survives
.dockerignore, and the build context that .dockerignore leaves is enough to
build the package (a wheel is built from exactly those files).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

from tests.conftest import REPO

DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "k8s"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


def exec_form(rest: str) -> list[str]:
    return yaml.safe_load(rest)  # a JSON array is YAML


def research_agent_pod() -> dict:
    documents = yaml.safe_load_all((K8S / "agent" / "statefulset.yaml").read_text())
    (deployment,) = [d for d in documents if d and d["kind"] == "StatefulSet"]
    return deployment["spec"]["template"]["spec"]


def test_base_images_are_pinned_slim_python_311():
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert froms
    for rest in froms:
        image = rest.split()[0]
        assert image != "scratch"
        assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), f"{image}: not a pinned 3.11 slim"


def test_the_final_stage_runs_as_the_pods_non_root_user():
    final = stages()[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, "a numeric non-root USER lets runAsNonRoot verify it"
    pod = research_agent_pod()["securityContext"]
    assert int(uid) == pod["runAsUser"] and int(gid or uid) == pod["runAsGroup"]
    run = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert f"--uid {uid}" in run and f"--gid {gid or uid}" in run


def test_entrypoint_and_config_path_are_the_manifests():
    final = stages()[-1]
    (entrypoint,) = [exec_form(rest) for keyword, rest in final if keyword == "ENTRYPOINT"]
    (command,) = [exec_form(rest) for keyword, rest in final if keyword == "CMD"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["agent-sidecar"] and "agent-sidecar" in scripts
    pod = research_agent_pod()
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "agent-sidecar"]
    assert sidecar["args"] == command, "the pod's args are the image's default command"
    env_lines = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "PATH=/opt/agent-sidecar/bin:$PATH" in env_lines
    assert "/opt/agent-sidecar" in " ".join(rest for keyword, rest in stages()[0] if keyword == "RUN")
    (agent,) = pod["containers"]
    assert agent["command"][0].startswith("/opt/agent-sidecar/bin/")


# --- the build context ----------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        rules.append((negate, _pattern_regex(pattern.strip("/"))))
    return rules


def in_context(rel: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern matching the path (or one of its parent directories) decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negate, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def context_files() -> list[str]:
    rules = dockerignore_rules()
    files = []
    for directory, subdirectories, names in os.walk(REPO):
        base = Path(directory).relative_to(REPO)
        subdirectories[:] = [d for d in subdirectories if (base / d).as_posix() not in (".git", ".venv")]
        for name in names:
            rel = (base / name).as_posix()
            if in_context(rel, rules):
                files.append(rel)
    return sorted(files)


def test_dockerignore_leaves_only_what_the_build_copies():
    files = context_files()
    assert "pyproject.toml" in files and "README.md" in files
    assert "sidecar/policy/opa/client.py" in files and "sidecar/v1/sidecar_pb2.py" in files
    for excluded in ("tests/", "deploy/", "rego/", ".venv/", "var/", "docs/"):
        assert not any(f.startswith(excluded) for f in files), excluded
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    for keyword, rest in instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            *sources, _ = shlex.split(rest)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: missing"
                assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in files), (
                    f"COPY {source}: excluded by .dockerignore"
                )


def test_the_build_context_builds_the_package(tmp_path):
    context = tmp_path / "context"
    for rel in context_files():
        target = context / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, target)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("agent_sidecar-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("sidecar/policy/opa/client.py", "sidecar/policy/opa/runner.py", "sidecar/policy/breaker.py", "sidecar/v1/sidecar_pb2.py", "sidecar/cli.py"):
        assert module in names, module
    (entry_points,) = [n for n in names if n.endswith("entry_points.txt")]
    assert "agent-sidecar = sidecar.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    requirements = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: httptools" in requirements  # the OPA client's HTTP parser ships in the image
