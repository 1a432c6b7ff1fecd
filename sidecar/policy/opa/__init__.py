"""OPA, the one policy engine: `runner` runs it, `client` asks it, `tools` lints/tests/builds, `service` serves a policy directory."""
