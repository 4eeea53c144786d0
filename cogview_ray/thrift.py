"""Thrift compact protocol, schema-less: decode and re-encode the structs of Parquet footers
and page headers. A struct is {field id: (type, value)}; a list is (element type, [values])."""
from __future__ import annotations

from typing import Any


class ThriftError(ValueError):
    """Bytes that are not a Thrift compact struct this decoder accepts."""


TRUE, FALSE, I8, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(1, 13)
_MAX_DEPTH = 32


class Decoder:
    """Reads from `buf` at `pos`; EOFError when the bytes end first (fetch more, retry)."""

    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = memoryview(buf), pos

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise EOFError  # the caller may fetch more bytes and retry
        self.pos += 1
        return self.buf[self.pos - 1]

    def varint(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 70:
                raise ThriftError("varint too long")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise EOFError
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def value(self, t: int, depth: int) -> Any:
        if t in (I16, I32, I64):
            return self.zigzag()
        if t == BINARY:
            return self.take(self.varint())
        if t == STRUCT:
            return self.struct(depth + 1)
        if t in (LIST, SET):
            head = self.byte()
            size, et = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            if size > len(self.buf) - self.pos:  # each element takes at least a byte
                raise EOFError
            if et in (TRUE, FALSE):
                return et, [self.byte() == TRUE for _ in range(size)]
            return et, [self.value(et, depth) for _ in range(size)]
        if t == I8:
            return self.byte()
        if t == DOUBLE:
            return self.take(8)
        if t == MAP:
            size = self.varint()
            kv = self.byte() if size else 0
            kt, vt = kv >> 4, kv & 0x0F
            return kt, vt, [(self.value(kt, depth), self.value(vt, depth)) for _ in range(size)]
        raise ThriftError(f"thrift type {t}")

    def struct(self, depth: int = 0, stop_at: int | None = None) -> dict:
        """The struct's fields; with `stop_at`, only those before the first field whose id is
        `stop_at` or more (writers order fields by id: a footer's schema precedes its row groups)."""
        if depth > _MAX_DEPTH:
            raise ThriftError("thrift structs nested too deeply")
        fields, last = {}, 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            t, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            if stop_at is not None and fid >= stop_at:
                return fields
            fields[fid] = (t, t == TRUE) if t in (TRUE, FALSE) else (t, self.value(t, depth))
            last = fid


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)


def _put_zigzag(out: bytearray, v: int) -> None:
    _put_varint(out, (v << 1) ^ (v >> 63))


def _put_value(out: bytearray, t: int, v: Any) -> None:
    if t in (I16, I32, I64):
        _put_zigzag(out, v)
    elif t == BINARY:
        _put_varint(out, len(v))
        out += v
    elif t == STRUCT:
        encode_struct(out, v)
    elif t in (LIST, SET):
        et, elements = v
        if len(elements) < 15:
            out.append(len(elements) << 4 | et)
        else:
            out.append(0xF0 | et)
            _put_varint(out, len(elements))
        for item in elements:
            if et in (TRUE, FALSE):
                out.append(TRUE if item else FALSE)
            else:
                _put_value(out, et, item)
    elif t == I8:
        out.append(v)
    elif t == DOUBLE:
        out += v
    else:  # MAP
        kt, vt, pairs = v
        _put_varint(out, len(pairs))
        if pairs:
            out.append(kt << 4 | vt)
        for k, item in pairs:
            _put_value(out, kt, k)
            _put_value(out, vt, item)


def encode_struct(out: bytearray, fields: dict) -> None:
    """Append `fields` to `out`, in field-id order (as Thrift writers do)."""
    last = 0
    for fid, (t, v) in sorted(fields.items()):
        if t in (TRUE, FALSE):
            t = TRUE if v else FALSE
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | t)
        else:
            out.append(t)
            _put_zigzag(out, fid)
        if t not in (TRUE, FALSE):
            _put_value(out, t, v)
        last = fid
    out.append(0)


def get(s: dict, fid: int, default: Any = None) -> Any:
    """The value of field `fid` of a decoded struct, or `default`."""
    return s[fid][1] if fid in s else default


def items(s: dict, fid: int) -> list:
    """The elements of a list field (empty if absent)."""
    return get(s, fid, (0, []))[1]
