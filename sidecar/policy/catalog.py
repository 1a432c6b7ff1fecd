"""The tool catalog (`data.sidecar.catalog.tools`) and revision of a policy directory.

The Gate puts a tool's catalog entry into the input (`input.tool.catalog`)
and needs the policy's revision for calls refused before policy runs; it
reads both from here, never from OPA.

Data files are placed the way OPA places them in a bundle: `data.json` /
`data.yaml` at the directory path they sit in (`rego/sidecar/catalog/
data.yaml` is `data.sidecar.catalog`). Hidden files and directories are
skipped, as `opa build --ignore '.*'` skips them.

`revision` is "sha256:" + 16 hex digits of every file OPA would load
(`.rego`, data files, `.manifest`), so the same files always give the same
revision; the managed OPA is built with this revision (`opa build
--revision`), which is what it reports in `?provenance`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

DATA_FILES = ("data.json", "data.yaml", "data.yml")


class CatalogError(ValueError):
    """The directory cannot be read as a policy bundle; `problems` are "file: message" strings."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Catalog:
    """Tool name → catalog entry (a mapping), and the revision of the files it came from."""

    def __init__(self, tools: Mapping[str, Any], revision: str):
        self._tools = {name: dict(entry) for name, entry in tools.items() if isinstance(entry, dict)}
        self.revision = revision

    def entry(self, tool: str) -> dict | None:
        """The catalog entry for `tool` (a copy), or None when the catalog does not list it."""
        entry = self._tools.get(tool)
        return dict(entry) if entry is not None else None

    def __len__(self) -> int:
        return len(self._tools)

    @classmethod
    def read(cls, directory: str | Path) -> "Catalog":
        """Read the catalog from a policy directory; CatalogError naming each unreadable file."""
        data, revision = read_data(directory)
        tools = data.get("sidecar", {}).get("catalog", {}).get("tools", {})
        if not isinstance(tools, dict):
            raise CatalogError([f"{directory}: data.sidecar.catalog.tools is not an object"])
        return cls(tools, revision)


def bundle_files(root: Path) -> list[Path]:
    """The files OPA loads from a policy directory, sorted; hidden directories and files skipped."""
    found = []
    for path in root.rglob("*"):
        parts = path.relative_to(root).parts
        if not path.is_file() or any(part.startswith(".") for part in parts[:-1]):
            continue
        if path.name == ".manifest" or path.suffix == ".rego" or path.name in DATA_FILES:
            found.append(path)
    return sorted(found)


def read_data(directory: str | Path) -> tuple[dict, str]:
    """(merged data document, revision) of a policy directory; CatalogError if a file is unreadable."""
    root = Path(directory)
    if not root.is_dir():
        raise CatalogError([f"{root}: policy directory does not exist"])
    data: dict[str, Any] = {}
    problems: list[str] = []
    digest = hashlib.sha256()
    for path in bundle_files(root):
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        if path.name not in DATA_FILES:
            continue
        try:
            value = json.loads(raw) if path.name == "data.json" else yaml.safe_load(raw)
        except (ValueError, yaml.YAMLError) as exc:
            problems.append(f"{rel}: not valid {'JSON' if path.name == 'data.json' else 'YAML'}: {exc}")
            continue
        if value is not None:
            _merge_at(data, path.parent.relative_to(root).parts, value, rel, problems)
    if problems:
        raise CatalogError(problems)
    return data, "sha256:" + digest.hexdigest()[:16]


def _merge_at(data: dict, prefix: tuple[str, ...], value: Any, rel: str, problems: list[str]) -> None:
    if not prefix:
        if not isinstance(value, dict):
            problems.append(f"{rel}: data at the bundle root must be an object")
            return
        data.update(value)
        return
    node = data
    for part in prefix[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            problems.append(f"{rel}: data path {'/'.join(prefix)} collides with a non-object value")
            return
    last = prefix[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last].update(value)
    elif last in node:
        problems.append(f"{rel}: data path {'/'.join(prefix)} is defined twice")
    else:
        node[last] = value
