"""argparse types and argument checks the CLI's commands share: a bad value is a usage error
(exit 2) naming it, never taken for a finding."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Callable

from sidecar.config import ConfigError

EVIDENCE_DIR = "the evidence directory, evidence.dir"


def _number(text: str, parse: Callable[[str], Any], what: str, accept: Callable[[Any], bool], rule: str) -> Any:
    """An argparse type's work: `parse(text)` when `accept` takes it, else a usage error naming the value."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, not {text}")
    return value


def count(text: str) -> int:
    """argparse type of a count (`--limit N`): a whole number, 0 or more."""
    return _number(text, int, "a whole number", lambda value: value >= 0, "0 or more")


def seconds(text: str) -> float:
    """argparse type of a duration in seconds (`--timeout`): a number above 0 (and not inf or nan)."""
    return _number(text, float, "a number of seconds", lambda value: 0 < value < float("inf"),
                   "a number of seconds above 0")


def name(text: str) -> str:
    """argparse type of a name (`--tool`): not empty."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def log_id(text: str) -> str:
    """argparse type of an evidence log's id (`--log-id`): a UUID as the log writes it (8-4-4-4-12 hex
    digits, RFC 9562 section 4), given in lower case. Anything else, a stray space included, is bad
    usage (exit 2), never a log found BROKEN for naming another id."""
    if not re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log id (a UUID such as 0f8e2c1a-5b7d-4e3f-9a61-2d4c8b0e7f13, as `evidence verify` "
            "prints it after 'log id:')"
        )
    return text.lower()


def existing_directory(path: str, what: str, option: str = "") -> str:
    """`path` if it is a directory this process can read; else bad usage (exit 2), never a finding.

    A finding (a failed test, a BROKEN log) must mean the thing examined is
    wrong, so a script can tell it from a typo in the path.
    """
    named = f"{option}: {path}" if option else path
    if not os.path.isdir(path):
        problem = "no such directory" if not os.path.exists(path) else "not a directory"
        raise ConfigError(f"{named}: {problem} (give {what})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{named}: cannot read this directory (give {what})")
    return path
