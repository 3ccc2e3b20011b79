"""Read a W&B run back from disk (``wandb/offline-run-*/run-*.wandb``) without the network.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of
records, each with a 7-byte header (CRC32, length, type FULL/FIRST/MIDDLE/LAST) around a chunk of a
serialized ``wandb_internal_pb2.Record``. The W&B service writes whole blocks while a run is alive and
the last, partial one when the run finishes, so the file of a live or killed run ends at a block
boundary, possibly inside a record: the readers here stop at the last complete record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def scan_records(chunk: bytes, start: int = 0) -> tuple[list[bytes], int]:
    """The complete serialized records in ``chunk``, the bytes of a ``.wandb`` file from offset ``start`` on.

    ``start`` is 0 (the file's beginning) or an offset this function returned. Returns the records and the
    offset just after the last complete one, from which a later scan of the grown file reads only new records.

    >>> header = b":W&B" + bytes(3)
    >>> record = struct.pack("<IHB", 0, 2, _FULL) + b"hi"
    >>> scan_records(header + record + record[:5])  # the second record is cut short
    ([b'hi'], 16)
    >>> scan_records(record, start=16)
    ([b'hi'], 25)
    """
    pos = start
    if start == 0:
        if chunk[:4] != b":W&B":
            raise ValueError("not a W&B run file (it does not start with ':W&B').")
        pos = _HEADER
    data_end = start + len(chunk)
    out, buf, resume = [], b"", pos
    while pos + _HEADER <= data_end:
        offset = pos % _BLOCK
        if _BLOCK - offset < _HEADER:  # block trailer too small for a header: zero padding
            pos += _BLOCK - offset
            continue
        at = pos - start  # the same position in `chunk`
        _crc, length, kind = struct.unpack("<IHB", chunk[at : at + _HEADER])
        if kind == 0:  # zero-filled rest of a block
            pos += _BLOCK - offset
            continue
        if pos + _HEADER + length > data_end:  # a record still being written
            break
        payload = chunk[at + _HEADER : at + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            out.append(payload)
            resume = pos
        elif kind == _FIRST:
            buf = payload
        elif kind == _MIDDLE:
            buf += payload
        elif kind == _LAST:
            out.append(buf + payload)
            buf, resume = b"", pos
    return out, resume


def read_new_records(path: str | Path, start: int = 0) -> tuple[list[bytes], int]:
    """The complete records of a ``.wandb`` file from offset ``start`` on, and the offset to continue from.

    ``start`` is 0 or an offset this function returned: reading a growing file again reads only its new
    records (see :func:`scan_records`).
    """
    with open(path, "rb") as f:
        f.seek(start)
        chunk = f.read()
    try:
        return scan_records(chunk, start)
    except ValueError as err:
        raise ValueError(f"{path} is {err}") from None


def read_records(path: str | Path) -> list[bytes]:
    """The complete serialized records of a ``.wandb`` file, in order."""
    return read_new_records(path)[0]


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def history_keys(records: list[bytes]) -> dict[int, set[str]]:
    """``{_step: names logged at that step}`` of the history rows among ``records`` (nested names joined by ``/``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, set[str]] = {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {_key(i): i.value_json for i in record.history.item}
        step = int(json.loads(items.pop("_step"))) if "_step" in items else record.history.step.num
        out.setdefault(step, set()).update(k for k in items if not k.startswith("_"))
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
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                summary[_key(item)] = json.loads(item.value_json)
    return {"history": history, "config": config, "summary": summary}
