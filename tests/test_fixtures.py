"""The demo fixture is reproducible from its script, byte for byte."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, TINY


def test_tiny_checkpoint_regenerates_identically(tmp_path) -> None:
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_checkpoint.py"), str(out)], check=True)
    shipped = sorted(p.name for p in TINY.iterdir())
    assert sorted(p.name for p in out.iterdir()) == shipped
    for name in shipped:
        assert (out / name).read_bytes() == (TINY / name).read_bytes(), name
