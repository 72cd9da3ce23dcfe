"""The checked-in Python stubs are exactly what `python -m clients.generate` makes from protos/,
and they import as clients.weft.v1 with no sys.path tricks."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from clients import generate

ROOT = Path(__file__).resolve().parent.parent


def test_stubs_are_up_to_date() -> None:
    stale = generate.stale_files()
    assert not stale, f"stubs are stale ({stale}): run `make protos`"


def test_staleness_check_sees_an_edited_stub(tmp_path) -> None:
    copy = tmp_path / "clients"
    shutil.copytree(ROOT / "clients" / "weft", copy / "weft", ignore=shutil.ignore_patterns("__pycache__"))
    assert generate.stale_files(copy) == []
    target = copy / "weft" / "v1" / "inference_pb2.pyi"
    target.write_text(target.read_text().replace("max_model_len", "max_model_length", 1))
    (copy / "weft" / "v1" / "old_pb2.py").write_text("")
    (copy / "weft" / "v1" / "guided_pb2_grpc.py").unlink()
    assert generate.stale_files(copy) == [
        "missing: weft/v1/guided_pb2_grpc.py", "extra: weft/v1/old_pb2.py", "differs: weft/v1/inference_pb2.pyi"]


def test_stubs_import_without_a_top_level_weft_package() -> None:
    # A fresh interpreter: generated code importing `weft.v1...` would fail there, since no
    # `weft` package is on the path; the rewritten imports must not need one.
    code = (
        "import sys; from clients.weft.v1 import inference_pb2, inference_pb2_grpc, guided_pb2; "
        "assert 'weft' not in sys.modules; "
        "assert inference_pb2.GenerateRequest.DESCRIPTOR.full_name == 'weft.v1.GenerateRequest'; "
        "assert inference_pb2.DESCRIPTOR.name == 'weft/v1/inference.proto'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for path in (ROOT / "clients" / "weft" / "v1").glob("*.py*"):
        text = path.read_text()
        assert "from weft.v1 import" not in text and "import weft.v1" not in text, path


def test_every_proto_field_is_documented() -> None:
    # Clients we don't control read the .proto: every field, enum value, message and rpc has a
    # comment on the line(s) just above it.
    for proto in sorted((ROOT / "protos" / "weft" / "v1").glob("*.proto")):
        lines = [line.strip() for line in proto.read_text().splitlines()]
        for i, s in enumerate(lines):
            is_field = s.endswith(";") and "=" in s and not s.startswith(("option ", "syntax ", "reserved ", "//"))
            if is_field or s.startswith(("message ", "enum ", "rpc ", "service ")):
                assert lines[i - 1].startswith("//"), f"{proto.name}:{i + 1}: undocumented: {s}"
