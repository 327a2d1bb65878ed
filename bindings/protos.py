"""Generate the checked-in gRPC stubs from ``forvalue.proto`` (needs grpcio-tools).

    python -m forvalue.bindings.protos      # rewrites forvalue_pb2.py and forvalue_pb2_grpc.py

The proto is compiled under the virtual path ``forvalue/bindings/`` so that the stubs import
each other as ``forvalue.bindings.forvalue_pb2`` (protoc otherwise writes a top-level import
that breaks inside a package).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "forvalue.proto"
STUBS = ("forvalue_pb2.py", "forvalue_pb2_grpc.py")
VIRTUAL_DIR = "forvalue/bindings"


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto; returns the paths of the stubs written into ``out_dir``."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        status = protoc.main(["grpc_tools.protoc", f"-I{VIRTUAL_DIR}={HERE}", f"--python_out={tmp}",
                              f"--grpc_python_out={tmp}", f"{VIRTUAL_DIR}/{PROTO}"])
        if status != 0:
            raise RuntimeError(f"protoc failed on {HERE / PROTO} (status {status})")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in STUBS:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / VIRTUAL_DIR / name, target)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
