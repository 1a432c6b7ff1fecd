"""docs/configuration.md documents every key the config loader accepts, and only those, with their defaults;
every config example in the docs loads."""

from __future__ import annotations

import dataclasses
import re

import yaml

from sidecar.config import Config
from tests.conftest import REPO


def config_keys(cls=Config, prefix: str = "") -> set[str]:
    keys = set()
    for field in dataclasses.fields(cls):
        name = f"{prefix}{field.name}"
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if dataclasses.is_dataclass(default):
            keys |= config_keys(type(default), name + ".")
        else:
            keys.add(name)
    return keys


def test_every_config_key_is_documented():
    text = (REPO / "docs" / "configuration.md").read_text()
    missing = sorted(k for k in config_keys() if f"`{k}`" not in text)
    assert not missing, f"undocumented config keys: {missing}"


def test_the_docs_name_no_key_that_does_not_exist():
    text = (REPO / "docs" / "configuration.md").read_text()
    sections = {k.split(".")[0] for k in config_keys()}
    documented = {m for m in re.findall(r"^\| `([a-z_.]+)` \|", text, re.MULTILINE) if m.split(".")[0] in sections}
    assert documented <= config_keys(), sorted(documented - config_keys())


def test_the_complete_example_is_the_defaults():
    """docs/configuration.md's "complete example with the defaults" is Config()'s: every key, every value."""
    text = (REPO / "docs" / "configuration.md").read_text()
    example = yaml.safe_load(re.search(r"defaults.*?```yaml\n(.*?)```", text, re.S).group(1))
    defaults = json_like(dataclasses.asdict(Config()))
    assert example == defaults


def json_like(value):
    """Tuples as the lists YAML writes."""
    if isinstance(value, dict):
        return {k: json_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_like(v) for v in value]
    return value


def test_each_keys_documented_default_is_its_default():
    """The `default` column of the key tables (the first row naming a key; "Outside dev mode" comes after)."""
    defaults = json_like(dataclasses.asdict(Config()))
    text = (REPO / "docs" / "configuration.md").read_text()
    checked, wrong = set(), []
    for key, default in re.findall(r"^\| `([a-z_.]+)` \| `([^`|]*)` \|", text, re.MULTILINE):
        value = defaults
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if key in checked or value is None:
            continue
        checked.add(key)
        documented = yaml.safe_load(default) if default != "email:" else default
        if documented != value:
            wrong.append((key, default, value))
    assert len(checked) > 100, "the tables were read"
    assert not wrong, wrong


def test_every_config_example_in_the_docs_loads(tmp_path):
    """A ```yaml block whose top-level keys are config sections is a config a reader copies: it loads
    (runs_sidecar=False: fragments need not hold everything serve needs). Other YAML (catalog, grants) is not one."""
    import textwrap

    from sidecar.config import load_config

    sections = {field.name for field in dataclasses.fields(Config)}
    loaded = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in re.finditer(r"^(?P<i>[ \t]*)```yaml[^\n]*\n(?P<body>.*?)^(?P=i)```", text, re.M | re.S):
            body = textwrap.dedent(match.group("body"))
            data = yaml.safe_load(body)
            if isinstance(data, dict) and set(data) <= sections:
                where = f"{path.name}:{text[:match.start()].count(chr(10)) + 1}"
                (tmp_path / "example.yaml").write_text(body)
                load_config(str(tmp_path / "example.yaml"), {}, runs_sidecar=False)  # ConfigError names the key
                loaded.append(where)
    assert len(loaded) >= 4, loaded
