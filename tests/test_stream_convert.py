"""convert streams weights: it reads the checkpoint a band of rows at a time into the data file."""

from __future__ import annotations

from conftest import TRAINED

import parscale_export.weightwriter as weightwriter
from parscale_export.bundle import DATA_FILE
from parscale_export.checkpoint import Checkpoint
from parscale_export.export import ExportOptions, convert


def test_convert_reads_a_band_at_a_time_and_reports_progress(tmp_path, monkeypatch) -> None:
    """With 1 KiB chunks, no read of a weight is larger than a chunk (or one row), except the
    prefixes (permuted whole: a few KiB at any size) and tensors of at most 1024 elements (the
    optimizer compares those); progress counts up to every byte of every weight."""
    reads = []
    read = Checkpoint.read

    def recording(self, name, dtype, start=0, stop=None):
        tensor = read(self, name, dtype, start, stop)
        reads.append((name, tensor.numel(), tensor.element_size(), tensor[0].numel() if tensor.dim() else 1))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", recording)
    monkeypatch.setattr(weightwriter, "CHUNK_BYTES", 1024)
    calls = []
    convert(TRAINED, tmp_path / "out", ExportOptions(), progress=lambda done, total: calls.append((done, total)))
    assert reads
    for name, count, size, row in reads:
        if not name.endswith(("prefix_k", "prefix_v")) and count > 1024:
            assert count * size <= max(1024, row * size), (name, count)
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1]
    assert calls[-1][1] <= (tmp_path / "out" / DATA_FILE).stat().st_size  # the file adds only alignment


def test_progress_bar_gives_a_rate_only_once_it_means_something(monkeypatch, capsys) -> None:
    """The first call of a write has no rate (its elapsed time is microseconds: it printed
    1952648.2 GiB/s); from half a second on, bytes per second and the time left."""
    from parscale_export.cli import convert as command

    clock = iter([10.0, 10.0, 12.0])
    monkeypatch.setattr(command.time, "perf_counter", lambda: next(clock))
    bar = command.ProgressBar()
    for done in (0, 2 << 20, 4 << 20):
        bar(done, 8 << 20)
    lines = capsys.readouterr().err.splitlines()
    assert "/s" not in lines[0] and "left" not in lines[0], lines[0]
    assert lines[-1].endswith("4.0 MiB of 8.0 MiB, 2.0 MiB/s, 0:02 left"), lines[-1]
