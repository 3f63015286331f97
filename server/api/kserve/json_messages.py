"""Protobuf messages in the spelling of KServe v2's REST API (Triton's): metadata, config and
statistics answered over HTTP are the gRPC API's messages, written as JSON."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def message_dict(msg: Message) -> dict[str, Any]:
    """A protobuf message as the REST API's JSON, as Triton writes it: field names as in the
    .proto, every field (zeros included, so ``stats["inference_stats"]["fail"]["count"]`` exists),
    only the chosen member of a oneof, enums by name, and 64-bit integers as JSON numbers
    (``json_format`` would make them strings, which clients reading shapes and counts do not expect)."""
    out = {}
    for f in msg.DESCRIPTOR.fields:
        oneof = f.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != f.name:
            continue
        out[f.name] = _field(f, getattr(msg, f.name))
    return out


def _field(f: FieldDescriptor, value: Any) -> Any:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value_field = f.message_type.fields_by_name["value"]
        return {str(k): _scalar(value_field, v) for k, v in value.items()}
    if _repeated(f):
        return [_scalar(f, v) for v in value]
    return _scalar(f, value)


def _repeated(f: FieldDescriptor) -> bool:
    # ``is_repeated`` is protobuf >= 5's spelling; ``label`` is deprecated there.
    is_repeated = getattr(f, "is_repeated", None)
    if is_repeated is not None:
        return bool(is_repeated() if callable(is_repeated) else is_repeated)
    return f.label == FieldDescriptor.LABEL_REPEATED


def _scalar(f: FieldDescriptor, value: Any) -> Any:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return message_dict(value)
    if f.type == FieldDescriptor.TYPE_ENUM:
        return f.enum_type.values_by_number[value].name if value in f.enum_type.values_by_number else value
    if f.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode()
    return value
