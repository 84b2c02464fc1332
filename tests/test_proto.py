"""The generated gRPC code must match protos/: regenerate into a scratch folder and compare."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["neuron_pb2.py", "neuron_pb2.pyi", "neuron_pb2_grpc.py"]


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(ROOT / "protos/helexa/neuron/v1/neuron.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "helexa/neuron/v1" / name).read_text()
        committed = (ROOT / "helexa/neuron/v1" / name).read_text()
        assert fresh == committed, f"helexa/neuron/v1/{name} is stale: run `make proto`"
