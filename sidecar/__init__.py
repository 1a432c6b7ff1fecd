"""agent-sidecar: every AI-agent tool call through a SPIFFE identity and OPA policy, with evidence."""

from importlib import metadata


def package_version() -> str:
    """The installed agent-sidecar's version (pyproject.toml), or "unknown" outside an install."""
    try:
        return metadata.version("agent-sidecar")
    except metadata.PackageNotFoundError:
        return "unknown"
