"""docs/configuration.md documents every key the config loader accepts, and only those."""

from __future__ import annotations

import dataclasses
import re

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
