"""Re-point several graphs' external data so that what they share is stored once.

ONNX external data is a (location, offset, length) triple on each initializer, with location
relative to the graph's own folder; nothing stops two graphs, or two initializers of one graph,
from pointing at the same bytes. Shared payloads are recognised by content (dtype, shape and a
sha256 of the bytes), not by name: the exporter names folded constants freely.

Members arrive one at a time, each an ordinary bundle folder (model.onnx + model.onnx.data),
smallest P first, and their folders can be deleted as soon as they are stored, so converting
needs the shared file plus one member's bundle of disk, not every member at once:
  SHARED_DATA_FILE       the first member's payloads (for a family with P=1: exactly the backbone)
  model.p{P}.onnx.data   what a later member holds that the first does not (prefixes, aggregation)
  model.p{P}.onnx        each member's graph, pointing into those two files
Payloads are written in member order, then graph order, so two merges give identical bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from .bundle import DATA_FILE, MODEL_FILE, SHARED_DATA_FILE, member_file

ALIGN = 64  # byte alignment of each payload, as convert writes them
CHUNK = 64 << 20  # bytes read at a time


class SharedStore:
    """Writes a family's graphs and data files into `out_dir`, one member at a time."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.stored: dict[str, tuple[int, int]] = {}  # payload key -> (offset, length) in the shared file

    def add(self, parallel: int, folder: Path) -> dict:
        """Store the bundle in `folder` as member P = `parallel`; returns its manifest `files` entry."""
        first = not self.stored
        proto = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        own_name = member_file(DATA_FILE, parallel)
        with (
            (folder / DATA_FILE).open("rb") as source,
            (self.out_dir / SHARED_DATA_FILE).open("ab") as shared,
            (self.out_dir / own_name).open("wb") as own,
        ):
            for tensor in proto.graph.initializer:
                if tensor.data_location != TensorProto.EXTERNAL:
                    continue
                offset, length = _location(tensor)
                key = _key(tensor, source, offset, length)
                if key not in self.stored and first:
                    self.stored[key] = (_append(shared, source, offset, length), length)
                if key in self.stored:
                    _point(tensor, SHARED_DATA_FILE, *self.stored[key])
                else:
                    _point(tensor, own_name, _append(own, source, offset, length), length)
            has_own = own.tell() > 0
        if not has_own:
            (self.out_dir / own_name).unlink()
        model_name = member_file(MODEL_FILE, parallel)
        onnx.save(proto, str(self.out_dir / model_name))
        return {"model": model_name, "external_data": [SHARED_DATA_FILE, *([own_name] if has_own else [])]}


def _location(tensor: TensorProto) -> tuple[int, int]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    return int(info.get("offset", 0)), int(info["length"])


def _chunks(source, offset: int, length: int) -> Iterator[bytes]:
    """A payload CHUNK bytes at a time: the largest (an embedding) never whole in memory."""
    source.seek(offset)
    while length > 0:
        chunk = source.read(min(CHUNK, length))
        if not chunk:
            raise OSError(f"data file ends {length} bytes before a tensor does")
        length -= len(chunk)
        yield chunk


def _key(tensor: TensorProto, source, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(source, offset, length):
        digest.update(chunk)
    digest.update(f"{tensor.data_type}:{list(tensor.dims)}".encode())
    return digest.hexdigest()


def _append(sink, source, offset: int, length: int) -> int:
    """Pad `sink` to the next ALIGN boundary, copy the payload there, and return its offset."""
    start = (sink.tell() + ALIGN - 1) // ALIGN * ALIGN
    sink.write(b"\0" * (start - sink.tell()))
    for chunk in _chunks(source, offset, length):
        sink.write(chunk)
    return start


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
