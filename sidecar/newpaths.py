"""The files and directories a start may create, noted before it does, removed again if it is refused.

    made = NewPaths()
    made.note(evidence_dir, *store.files)     # before anything creates them: the missing ones are noted
    ...                                       # the start creates some of them
    made.keep()                               # the start is committed: they stay
    made.remove()                             # else: every noted path is removed again (idempotent)

A refused start must leave the places it writes as it found them (server._claim): a path
that existed when noted is never removed, and a directory only when it is empty again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class NewPaths:
    """Paths that did not exist when noted, with their missing parent directories."""

    def __init__(self) -> None:
        self._missing: list[Path] = []  # outermost first

    def note(self, *paths: str | Path) -> None:
        for path in paths:
            chain = []
            path = Path(os.path.abspath(path))
            while not os.path.lexists(path) and path != path.parent:
                chain.append(path)
                path = path.parent
            self._missing.extend(reversed(chain))

    def keep(self) -> None:
        self._missing = []

    def remove(self) -> None:
        """Remove what exists now of the noted paths, innermost first; a directory only when empty."""
        missing, self._missing = self._missing, []
        for path in reversed(missing):
            try:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # a directory something else has put a file in since: it stays
                log.warning("could not remove %s, created by a start that was refused: %s", path, exc)
