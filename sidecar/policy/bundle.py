"""Load an OPA bundle directory (rego/) and check it before anything compiles it.

OPA's layout: `.rego` files anywhere, `data.json` / `data.yaml` at directory
paths (rego/sidecar/catalog/data.yaml is data.sidecar.catalog), an optional
`.manifest`. The revision is a digest of every file loaded, so two sidecars
serving the same files report the same `policy_revision`.

The lint here rejects what the embedded interpreter would accept but OPA 1.x
would not (Rego v0 rule bodies), and calls to builtins the embedded
interpreter lacks, each with the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

DATA_FILES = ("data.json", "data.yaml", "data.yml")


class BundleError(ValueError):
    """The bundle cannot be served; `problems` are "file:line: message" strings."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PolicyBundle:
    root: Path
    modules: dict[str, str]  # relative path -> source, policy files
    tests: dict[str, str]  # relative path -> source, *_test.rego files
    data: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)
    revision: str = ""

    def catalog_entry(self, tool: str) -> dict | None:
        tools = self.data.get("sidecar", {}).get("catalog", {}).get("tools", {})
        entry = tools.get(tool) if isinstance(tools, dict) else None
        return entry if isinstance(entry, dict) else None


def load_bundle(directory: str | Path) -> PolicyBundle:
    """Read every policy, test and data file; raise BundleError naming each bad file."""
    root = Path(directory)
    if not root.is_dir():
        raise BundleError([f"{root}: policy directory does not exist"])
    modules: dict[str, str] = {}
    tests: dict[str, str] = {}
    data: dict[str, Any] = {}
    manifest: dict[str, Any] = {}
    problems: list[str] = []
    digest = hashlib.sha256()

    for path in sorted(_bundle_files(root)):
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{rel}: not UTF-8")
            continue
        if path.name == ".manifest":
            try:
                manifest = json.loads(text)
            except json.JSONDecodeError as exc:
                problems.append(f"{rel}:{exc.lineno}: .manifest is not valid JSON: {exc.msg}")
        elif path.suffix == ".rego":
            (tests if path.name.endswith("_test.rego") else modules)[rel] = text
        else:
            try:
                value = json.loads(text) if path.name == "data.json" else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as exc:
                problems.append(f"{rel}: not valid {'JSON' if path.name == 'data.json' else 'YAML'}: {exc}")
                continue
            if value is None:
                continue
            prefix = path.parent.relative_to(root).parts
            _merge_at(data, prefix, value, rel, problems)

    if not modules and not problems:
        problems.append(f"{root}: no .rego policy files")
    problems += lint_modules({**modules, **tests})
    if problems:
        raise BundleError(problems)
    revision = "sha256:" + digest.hexdigest()[:16]
    return PolicyBundle(root, modules, tests, data, manifest, revision)


def _bundle_files(root: Path):
    for path in root.rglob("*"):
        rel_parts = path.relative_to(root).parts
        if any(part.startswith(".") for part in rel_parts[:-1]) or not path.is_file():
            continue
        if path.name == ".manifest" or path.suffix == ".rego" or path.name in DATA_FILES:
            yield path


def _merge_at(data: dict, prefix: tuple[str, ...], value: Any, rel: str, problems: list[str]) -> None:
    """Place a data file's value at its directory path, as OPA does."""
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


# --- lint -----------------------------------------------------------------

_TOKEN = re.compile(
    r"""(?P<comment>\#[^\n]*)
      | (?P<string>"(?:\\.|[^"\\\n])*")
      | (?P<raw>`[^`]*`)
      | (?P<newline>\n)
      | (?P<assign>:=|==|!=|<=|>=)
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
      | (?P<number>\d+(?:\.\d+)?)
      | (?P<punct>[{}()\[\],=|&+\-*/%<>:;])
      | (?P<space>[ \t\r]+)
      | (?P<other>.)
    """,
    re.VERBOSE,
)
_KEYWORDS = {
    "if", "not", "some", "every", "with", "as", "contains", "in", "else", "default",
    "package", "import", "true", "false", "null",
    "set",  # set() is the empty-set literal
}
# A "{" right after one of these opens an object or set literal, not a rule body.
_VALUE_CONTEXT = {":=", "=", "==", "!=", ",", "(", "[", "{", "in", "as", "|", "&", "+", "-", "*", "/", "%", "<", ">", "<=", ">=", ":", "if", "else", "contains", "not"}


@dataclass
class _Token:
    kind: str
    text: str
    line: int


def _tokens(source: str) -> list[_Token]:
    line = 1
    out: list[_Token] = []
    for match in _TOKEN.finditer(source):
        kind = match.lastgroup or "other"
        text = match.group()
        if kind not in ("comment", "space", "newline"):
            out.append(_Token(kind, text, line))
        line += text.count("\n")
    return out


def lint_modules(
    modules: dict[str, str], is_builtin: Callable[[str], bool] | None = None
) -> list[str]:
    """Problems ("file:line: message") that make a module unfit to serve."""
    if is_builtin is None:
        from regopy import Interpreter

        is_builtin = Interpreter().is_builtin
    tokenized = {name: _tokens(source) for name, source in modules.items()}
    user_functions: set[str] = set()
    for tokens in tokenized.values():
        user_functions |= _defined_functions(tokens)
    problems: list[str] = []
    for name, tokens in tokenized.items():
        problems += _lint_v0_bodies(name, tokens)
        problems += _lint_builtins(name, tokens, user_functions, is_builtin)
    return list(dict.fromkeys(problems))


def _defined_functions(tokens: list[_Token]) -> set[str]:
    """Names defined as functions at the top level (`f(x) := ...`, `f(x) if ...`)."""
    found = set()
    depth = 0
    for i, token in enumerate(tokens):
        if token.text in "([{" and token.kind == "punct":
            depth += 1
        elif token.text in ")]}" and token.kind == "punct":
            depth -= 1
        elif depth == 0 and token.kind == "name" and i + 1 < len(tokens) and tokens[i + 1].text == "(":
            prev = tokens[i - 1] if i else None
            if prev is None or prev.line < token.line or prev.text == "default":
                found.add(token.text)
    return found


def _lint_v0_bodies(name: str, tokens: list[_Token]) -> list[str]:
    problems = []
    depth = 0
    for i, token in enumerate(tokens):
        if token.kind != "punct":
            continue
        if token.text == "{":
            if depth == 0:
                prev = tokens[i - 1] if i else None
                if prev is not None and prev.text not in _VALUE_CONTEXT:
                    problems.append(
                        f"{name}:{token.line}: Rego v0 syntax: a rule body needs 'if' before '{{' "
                        "(and multi-value rules need 'contains'); OPA 1.x and this sidecar accept v1 only"
                    )
            depth += 1
        elif token.text in "([":
            depth += 1
        elif token.text in ")]}":
            depth -= 1
    return problems


def _lint_builtins(
    name: str, tokens: list[_Token], user_functions: set[str], is_builtin: Callable[[str], bool]
) -> list[str]:
    aliases = {"data", "input", "future", "rego"}
    for i, token in enumerate(tokens):
        if token.text == "import" and i + 1 < len(tokens):
            path = tokens[i + 1].text
            if i + 3 < len(tokens) and tokens[i + 2].text == "as":
                aliases.add(tokens[i + 3].text)
            else:
                aliases.add(path.rsplit(".", 1)[-1])
    problems = []
    for i, token in enumerate(tokens[:-1]):
        if token.kind != "name" or tokens[i + 1].text != "(" or token.text in _KEYWORDS:
            continue
        head = token.text.split(".", 1)[0]
        if head in aliases or token.text in user_functions or head in user_functions:
            continue
        if not is_builtin(token.text):
            problems.append(
                f"{name}:{token.line}: unsupported builtin {token.text}() "
                "(not available in the embedded Rego engine)"
            )
    return problems
