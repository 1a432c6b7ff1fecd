"""Sidecar configuration: YAML in, typed dataclasses out.

Every key is documented in docs/configuration.md. An unknown key or a value
of the wrong type is a ConfigError naming the key (`policy.timeout_ms: ...`),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class ListenConfig:
    # host:port for plaintext (or mTLS, see identity) gRPC; "" to disable.
    tcp: str = "127.0.0.1:50051"
    # Path of a unix socket for agents in the same pod; "" to disable.
    unix: str = ""


@dataclass
class PolicyConfig:
    # "embedded" (in-process Rego) or "opa" (OPA REST API beside the sidecar).
    engine: str = "embedded"
    # OPA bundle directory (rego/): policies, data and the tool catalog.
    dir: str = "rego"
    # Whole-decision budget; past it the call is denied.
    timeout_ms: int = 100
    max_input_bytes: int = 1024 * 1024
    max_depth: int = 64
    # Watch `dir` and swap in a new policy when it compiles and its tests pass.
    reload: bool = True
    # Threads evaluating the embedded engine, each with its own interpreter.
    workers: int = 2


@dataclass
class IdentityConfig:
    # Where the caller's identity comes from: any of workload_api, mtls,
    # jwt_svid; or dev alone. Order is precedence.
    sources: list[str] = field(default_factory=lambda: ["dev"])
    # The SPIFFE ID every caller gets in dev mode (marked source: dev).
    dev_spiffe_id: str = "spiffe://dev.local/agent"


@dataclass
class UsageConfig:
    # Sliding window behind input.usage.calls_in_window.
    window_seconds: int = 60
    # How many (subject, tool) pairs and tasks are tracked before the least
    # recently used are forgotten.
    max_tracked: int = 100_000


@dataclass
class SidecarConfig:
    # Instance id in input.request.sidecar and evidence; "" = hostname + pid.
    instance_id: str = ""
    # How many recent call_ids are remembered to refuse reuse with other arguments.
    call_id_memory: int = 100_000


@dataclass
class Config:
    listen: ListenConfig = field(default_factory=ListenConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)

    def validate(self) -> None:
        """Cross-field checks that a single field's type cannot express."""
        if self.policy.engine not in ("embedded", "opa"):
            raise ConfigError(f"policy.engine: must be 'embedded' or 'opa', not {self.policy.engine!r}")
        for key in ("timeout_ms", "max_input_bytes", "max_depth", "workers"):
            if getattr(self.policy, key) <= 0:
                raise ConfigError(f"policy.{key}: must be positive")
        if self.usage.window_seconds <= 0:
            raise ConfigError("usage.window_seconds: must be positive")
        if not self.listen.tcp and not self.listen.unix:
            raise ConfigError("listen: at least one of listen.tcp and listen.unix is needed")
        sources = self.identity.sources
        known = ("workload_api", "mtls", "jwt_svid", "dev")
        for source in sources:
            if source not in known:
                raise ConfigError(f"identity.sources: unknown source {source!r} (known: {', '.join(known)})")
        if not sources:
            raise ConfigError("identity.sources: at least one source is needed")
        if "dev" in sources and len(sources) > 1:
            raise ConfigError("identity.sources: 'dev' cannot be combined with a real identity source")
        from sidecar.identity.spiffe_id import SpiffeIdError, validate_spiffe_id

        try:
            validate_spiffe_id(self.identity.dev_spiffe_id)
        except SpiffeIdError as exc:
            raise ConfigError(f"identity.dev_spiffe_id: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load YAML from `path` (defaults when None), apply dotted-key overrides, validate."""
    raw: Any = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: must be a mapping")
        raw[section][key] = value
    config = _build(Config, raw, "")
    config.validate()
    return config


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: must be a mapping, not {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, key)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, not {_kind(value)}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, not {_kind(value)}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, not {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, not {_kind(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, not {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, not {_kind(value)}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {hint!r}")


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "empty"}.get(
        type(value), f"a {type(value).__name__}"
    )
