"""Numeric settings are finite and within range: a value that loads means what it says.

Every float setting took YAML's `.nan` and `.inf`: NaN passes each `<= 0` / `< 0` check, so
`evidence.checkpoint_every: 0` with `checkpoint_seconds: .nan` (the "both 0" refusal sidestepped)
ran with no checkpoint by time, an HTTP tool's `timeout_seconds: .inf` never timed out and `.nan`
timed out every call at once; `escalation.ttl_seconds: .inf` (or 1e12) loaded, and then every
escalated call failed with a gRPC UNKNOWN error (`year 33715 is out of range`) instead of an answer.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from sidecar.client import AsyncClient
from sidecar.config import MAX_ESCALATION_SECONDS, Config, ConfigError, load_config

# Entries of the mappings of named sections, so their float settings are reached too.
ENTRIES = {
    "mcp.upstreams": ("docs", {"url": "http://127.0.0.1:9/mcp"}),
    "invoke.tools": ("lookup", {"url": "http://127.0.0.1:9/lookup"}),
}


def float_settings(cls: type = Config, prefix: str = "") -> list[tuple[str, dict]]:
    """(dotted key, the raw config holding it) for every float setting, found from the dataclasses."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if hint is float:
            found.append((key, {}))
        elif dataclasses.is_dataclass(hint):
            found.extend(float_settings(hint, key + "."))
        elif typing.get_origin(hint) is dict and key in ENTRIES:
            (_, value_type) = typing.get_args(hint)
            name, entry = ENTRIES[key]
            for inner, _ in float_settings(value_type, ""):
                found.append((f"{key}.{name}.{inner}", entry))
    return found


SETTINGS = float_settings()


def test_the_walk_finds_the_float_settings():
    keys = {key for key, _ in SETTINGS}
    assert {"escalation.ttl_seconds", "evidence.checkpoint_seconds", "invoke.tools.lookup.timeout_seconds",
            "mcp.upstreams.docs.timeout_seconds", "telemetry.export_timeout_seconds"} <= keys
    assert len(keys) >= 15


def _yaml(key: str, entry: dict, literal: str) -> str:
    parts = key.split(".")
    if len(parts) == 4:  # section.mapping.name.setting
        section, mapping, name, setting = parts
        extra = "".join(f"      {k}: {v}\n" for k, v in entry.items())
        return f"{section}:\n  {mapping}:\n    {name}:\n{extra}      {setting}: {literal}\n"
    section, setting = parts
    return f"{section}:\n  {setting}: {literal}\n"


@pytest.mark.parametrize("literal", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key, entry", SETTINGS, ids=[key for key, _ in SETTINGS])
def test_no_float_setting_takes_nan_or_infinity(tmp_path: Path, key: str, entry: dict, literal: str):
    path = tmp_path / "sidecar.yaml"
    path.write_text("identity:\n  sources: [dev]\n" + _yaml(key, entry, literal))
    with pytest.raises(ConfigError) as info:
        load_config(path, runs_sidecar=False)
    assert str(info.value).startswith(f"{key}: must be a finite number"), str(info.value)


def test_the_same_settings_take_a_finite_number(tmp_path: Path):
    for key, entry in SETTINGS:
        path = tmp_path / "sidecar.yaml"
        path.write_text("identity:\n  sources: [dev]\n" + _yaml(key, entry, "1.5"))
        config = load_config(path, runs_sidecar=False)
        node = config
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == 1.5, key


@pytest.mark.parametrize("key", ["escalation.ttl_seconds", "escalation.use_window_seconds"])
@pytest.mark.parametrize("value", [1e12, MAX_ESCALATION_SECONDS + 1])
def test_escalation_times_must_be_dates(key: str, value: float):
    with pytest.raises(ConfigError) as info:
        load_config(None, {"identity.sources": ["dev"], key: value}, runs_sidecar=False)
    assert f"{key}: must be at most {MAX_ESCALATION_SECONDS}" in str(info.value)


async def test_the_longest_escalation_ttl_still_answers_the_agent(running_sidecar, sidecar_config):
    """At the limit a real sidecar escalates (it failed the call with UNKNOWN at 1e12 before the limit)."""
    sidecar = await running_sidecar(sidecar_config(**{
        "escalation.ttl_seconds": float(MAX_ESCALATION_SECONDS),
        "escalation.use_window_seconds": float(MAX_ESCALATION_SECONDS),
    }))
    async with AsyncClient(sidecar.addresses[0]) as client:
        result = await client.authorize("send_email", {"to": ["a@example.org"], "subject": "s", "body": "b"},
                                        task_id="t-ttl")
    assert result.outcome == "escalate", result.reasons
    assert result.escalation_id.startswith("esc-")
