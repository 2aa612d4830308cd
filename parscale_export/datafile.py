"""Re-point several graphs' external data so that what they share is stored once.

ONNX external data is a (location, offset, length) triple on each initializer, with location
relative to the graph's own folder; nothing stops two graphs, or two initializers of one
graph, from pointing at the same bytes. Shared payloads are recognised by content (dtype,
shape and a sha256 of the bytes), not by name: the exporter names folded constants freely.

Each member folder holds an ordinary bundle (model.onnx + model.onnx.data). The result in
`out_dir`: model.p{P}.onnx per member, SHARED_DATA_FILE with every payload used by two or more
members (the backbone), and model.p{P}.onnx.data with what only that member uses.
Payloads are written in member order, then graph order, so two merges give identical bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto

from .bundle import DATA_FILE, MODEL_FILE, SHARED_DATA_FILE, member_file

ALIGN = 64  # byte alignment of each payload, as the quantizer writes them


def merge_members(members: dict[int, Path], out_dir: Path) -> dict[int, dict]:
    """Write the merged graphs and data files; returns each member's manifest `files` entry."""
    protos = {p: onnx.load(str(folder / MODEL_FILE), load_external_data=False) for p, folder in members.items()}
    users: dict[str, set[int]] = {}
    for p, proto in protos.items():
        with (members[p] / DATA_FILE).open("rb") as source:
            for tensor in _external(proto):
                users.setdefault(_key(tensor, _payload(tensor, source)), set()).add(p)

    written: dict[str, tuple[int, int]] = {}  # key -> (offset, length) in the shared file
    files = {}
    with (out_dir / SHARED_DATA_FILE).open("wb") as shared:
        for p, proto in protos.items():
            own_name = member_file(DATA_FILE, p)
            with (members[p] / DATA_FILE).open("rb") as source, (out_dir / own_name).open("wb") as own:
                for tensor in _external(proto):
                    payload = _payload(tensor, source)
                    key = _key(tensor, payload)
                    if len(users[key]) == 1:
                        _point(tensor, own_name, _append(own, payload), len(payload))
                        continue
                    if key not in written:
                        written[key] = (_append(shared, payload), len(payload))
                    _point(tensor, SHARED_DATA_FILE, *written[key])
                has_own = own.tell() > 0
            data = [SHARED_DATA_FILE]
            if has_own:
                data.append(own_name)
            else:
                (out_dir / own_name).unlink()
            model_name = member_file(MODEL_FILE, p)
            onnx.save(proto, str(out_dir / model_name))
            files[p] = {"model": model_name, "external_data": data}
    return files


def _external(proto: onnx.ModelProto) -> list[TensorProto]:
    return [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def _payload(tensor: TensorProto, source) -> bytes:
    info = {entry.key: entry.value for entry in tensor.external_data}
    source.seek(int(info.get("offset", 0)))
    return source.read(int(info["length"]))


def _key(tensor: TensorProto, payload: bytes) -> str:
    digest = hashlib.sha256(payload)
    digest.update(f"{tensor.data_type}:{list(tensor.dims)}".encode())
    return digest.hexdigest()


def _append(sink, payload: bytes) -> int:
    """Pad `sink` to the next ALIGN boundary, write `payload` there, and return its offset."""
    offset = (sink.tell() + ALIGN - 1) // ALIGN * ALIGN
    sink.write(b"\0" * (offset - sink.tell()))
    sink.write(payload)
    return offset


def _point(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)
