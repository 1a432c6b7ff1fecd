"""What runs inside an evaluation process of the embedded engine.

regopy 1.5.2 keeps native memory for every distinct input it evaluates
(~140 KB per decision, measured; not freed with the interpreter), and some
Rego or input can crash it. So evaluation happens in worker processes that
are replaced after a bounded number of decisions and whose crash costs one
call, not the sidecar. Each worker compiles a policy snapshot once per
revision and keeps it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sidecar.policy.bundle import PolicyBundle, load_bundle
from sidecar.policy.compiler import DECISION_ENTRYPOINT, EvaluationError, new_interpreter, query

_compiled: tuple[str, Any, Any] | None = None  # (revision, interpreter, compiled bundle)


def write_snapshot(bundle: PolicyBundle) -> Path:
    """An immutable copy of a validated bundle's policy and data, for workers to load."""
    directory = Path(tempfile.mkdtemp(prefix="agent-sidecar-policy-"))
    for name, source in bundle.modules.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source)
    (directory / "data.json").write_text(json.dumps(bundle.data))
    return directory


def remove_snapshot(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def evaluate(snapshot: str, revision: str, document: dict) -> Any:
    """The raw `data.sidecar.decision` for `document`; raises EvaluationError."""
    global _compiled
    if _compiled is None or _compiled[0] != revision:
        interpreter = new_interpreter(load_bundle(snapshot), with_tests=False)
        _compiled = (revision, interpreter, interpreter.build(None, [DECISION_ENTRYPOINT]))
    _, interpreter, compiled = _compiled
    interpreter.set_input(document)
    return query(interpreter, compiled, DECISION_ENTRYPOINT)


def exit_with(sidecar_pid: int, interval: float = 1.0) -> None:
    """Pool initializer: leave when the sidecar is gone.

    Workers hold their own call queue's write end, so a sidecar that dies
    without shutting the pool down (SIGKILL, OOM) would leave them waiting
    forever, and with them the forkserver.
    """

    def watch() -> None:
        while True:
            time.sleep(interval)
            if not _alive(sidecar_pid):
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-sidecar", daemon=True).start()


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: fall back to a signal probe
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def warm(snapshot: str, revision: str) -> int:
    """Compile ahead of the first call; returns the worker's pid."""
    try:
        evaluate(snapshot, revision, {})
    except EvaluationError:
        pass  # an empty input may well be an error for the policy; it compiled
    return os.getpid()
