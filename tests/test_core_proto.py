"""The committed gRPC stubs match protos/ (run `make proto` after editing the .proto)."""

from __future__ import annotations

import filecmp
import subprocess
import sys

from tests.conftest import REPO

GENERATED = ["sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py"]


def test_generated_stubs_are_not_stale(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(REPO / "protos/sidecar/v1/sidecar.proto")],
        check=True,
    )
    stale = [name for name in GENERATED
             if not filecmp.cmp(tmp_path / "sidecar/v1" / name, REPO / "sidecar/v1" / name, shallow=False)]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"
