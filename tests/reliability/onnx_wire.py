"""A protobuf wire-format codec for the ONNX tests: read a serialized message into a tree of fields
(descending into submessages by `onnx`'s own descriptors), change the tree, and write it back, with
any tag, length or varint encoded over-long on purpose.

It shares nothing with service/onnx_check.py (the code under test): field numbers come from the
descriptors of the installed `onnx`, encodings from the protobuf wire-format spec
(https://protobuf.dev/programming-guides/encoding/).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5
TAG_HIGH_BIT = 1 << 32  # a 5-byte tag can carry bits 32..34; protobuf C++ drops them, upb refuses them


def varint(value: int, length: int | None = None, high: int = 0) -> bytes:
    """`value` as a varint: minimal, or padded to `length` bytes (continuation bits over zero
    groups: the value is unchanged, the encoding over-long), with `high` OR'd in on top (bits the
    reader may keep or drop, e.g. TAG_HIGH_BIT)."""
    value |= high
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    while length is not None and len(groups) < length:
        groups.append(0)
    return bytes(g | 0x80 for g in groups[:-1]) + bytes(groups[-1:])


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    """Lenient (the writer's inputs are well formed): value, next index."""
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


@dataclass
class Field:
    """One field occurrence. `value`: int (varint), bytes (fixed or opaque length-delimited), or a
    list of Fields (a submessage, `kind` its full type name). `tag`/`size`/`raw`: the exact bytes
    to write for the tag, the length prefix or the varint value instead of their minimal encoding."""

    number: int
    wire: int
    value: Any
    kind: str | None = None
    tag: bytes | None = None
    size: bytes | None = None
    raw: bytes | None = None

    def copy(self) -> "Field":
        return copy.deepcopy(self)


def parse(buf: bytes, descriptor) -> list[Field]:
    """The fields of one message; submessages (by `descriptor`, an onnx message descriptor) parsed too."""
    out, i = [], 0
    by_number = {f.number: f for f in descriptor.fields}
    while i < len(buf):
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, i = read_varint(buf, i)
            out.append(Field(number, wire, value))
        elif wire in (I64, I32):
            n = 8 if wire == I64 else 4
            out.append(Field(number, wire, buf[i:i + n]))
            i += n
        elif wire == LEN:
            size, i = read_varint(buf, i)
            body = buf[i:i + size]
            i += size
            fd = by_number.get(number)
            if fd is not None and fd.message_type is not None:
                out.append(Field(number, wire, parse(body, fd.message_type), kind=fd.message_type.full_name))
            else:
                out.append(Field(number, wire, body))
        else:
            raise ValueError(f"wire type {wire} in a corpus file")
    return out


def encode(fields: list[Field]) -> bytes:
    parts = []
    for f in fields:
        parts.append(f.tag if f.tag is not None else varint((f.number << 3) | f.wire))
        if f.wire == VARINT:
            parts.append(f.raw if f.raw is not None else varint(f.value))
        elif f.wire == LEN:
            body = encode(f.value) if isinstance(f.value, list) else bytes(f.value)
            parts += [f.size if f.size is not None else varint(len(body)), body]
        else:
            parts.append(bytes(f.value))
    return b"".join(parts)


def messages(fields: list[Field], kind: str = "onnx.ModelProto") -> Iterator[tuple[list[Field], str]]:
    """Every message of the tree, pre-order: (its field list, its full type name)."""
    yield fields, kind
    for f in fields:
        if isinstance(f.value, list):
            yield from messages(f.value, f.kind)


def of(proto) -> list[Field]:
    """The tree of an onnx message object."""
    return parse(proto.SerializeToString(), proto.DESCRIPTOR)


def message(number: int, proto_or_fields, kind: str | None = None) -> Field:
    if isinstance(proto_or_fields, list):
        return Field(number, LEN, proto_or_fields, kind=kind)
    return Field(number, LEN, of(proto_or_fields), kind=proto_or_fields.DESCRIPTOR.full_name)


def string(number: int, text: str | bytes) -> Field:
    return Field(number, LEN, text.encode() if isinstance(text, str) else text)


def integer(number: int, value: int) -> Field:
    return Field(number, VARINT, value)
