"""Read a W&B offline run back from disk (``wandb/offline-run-*/run-*.wandb``) without the network.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records, each with a 7-byte header (CRC32, length, type FULL/FIRST/MIDDLE/LAST) around a chunk of a
serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[bytes]:
    """The serialized records of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (it does not start with ':W&B').")
    pos, out, buf = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        offset = pos % _BLOCK
        if _BLOCK - offset < _HEADER:  # block trailer too small for a header: zero padding
            pos += _BLOCK - offset
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:  # zero-filled rest of a block
            pos += _BLOCK - offset
            continue
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
        elif kind == _FIRST:
            buf = payload
        elif kind == _MIDDLE:
            buf += payload
        elif kind == _LAST:
            out.append(buf + payload)
            buf = b""
    return out


def read_run(path: str | Path) -> dict[str, Any]:
    """``{"history": [row, ...], "config": {...}, "summary": {...}}`` of a ``.wandb`` file.

    Each history row maps metric names (nested keys joined by ``/``) to decoded JSON values.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    history: list[dict[str, Any]] = []
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for raw in read_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary}
