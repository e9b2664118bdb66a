"""The committed generated gRPC code equals what protos/generate.sh produces now."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_in_sync(tmp_path):
    subprocess.run(["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.is_file())
    assert generated, "generate.sh produced nothing"
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.exists(), f"{rel} is generated but not committed: run protos/generate.sh"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run protos/generate.sh"
    protos = sorted((ROOT / "protos" / "edgeheads" / "v1").glob("*.proto"))
    assert {p.stem for p in protos} == {p.name.split("_pb2")[0] for p in generated}
