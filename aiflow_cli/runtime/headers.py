"""Binary message headers: the tier protocol's hot-path messages (:class:`~aiflow_cli.runtime.protocol.Infer`,
:class:`~aiflow_cli.runtime.protocol.Result`) without JSON.

A header is the message's dataclass fields in a fixed order, encoded by their annotated types; the layout is
derived from the class, so a field added to a registered message (in the dataclass, with a supported type) is
carried with no change here. Layout, all little-endian::

    offset  size  field
     0      1     protocol version (PROTOCOL_VERSION)
     1      4     layout id: CRC-32 of the message's field names and types (nested classes included), so two
                  builds whose message differs by a field refuse each other instead of misreading the bytes
     5      ...   the fields: first every int (i64), float (f64) and bool (u8, 0 or 1) field in declaration
                  order, in one block; then every other field in declaration order:
                    str               u32 byte length + UTF-8
                    Optional[T]       u8 0 (absent) or 1 + T
                    tuple/list[T,...] u32 count + the items (ints: a packed i64 array)
                    tuple[A, B]       A then B
                    dict[str, T]      u32 count + (key, T) pairs
                    a dataclass       its own fields, laid out the same way

Decoding checks every length against the bytes that are left before it allocates anything, every bool is 0 or
1, every string is UTF-8, and the header must end exactly at its last field; any failure is a
:class:`TransportError` naming the message and the field, a version or layout mismatch a :class:`PeerRejected`.
The transport bounds the whole header (``max_meta_bytes``) before any of it is read.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from aiflow_cli.errors import PeerRejected, TransportError

_U32 = struct.Struct("<I")
_PREFIX = struct.Struct("<BI")
_SCALARS = {int: "q", float: "d", bool: "B"}


class _Malformed(Exception):
    """A structural fault, turned into a TransportError naming the message by :class:`HeaderCodec`."""


def _too_many(n: int, left: int) -> _Malformed:
    return _Malformed(f"declares {n} items, more than the {left} bytes left can hold")


def _past_end(n: int) -> _Malformed:
    return _Malformed(f"a string of {n} bytes runs past the end")


def _not_bool(v: int) -> _Malformed:
    return _Malformed(f"a bool is {v}, not 0 or 1")


# -- code generation -----------------------------------------------------------------------------------------------
# Each dataclass gets an encoder and a decoder written out as Python source (as dataclasses writes __init__):
# a generic interpreter of the layout costs several times more per message, and this runs on every decode step.
class _Gen:
    """Writes the source of one dataclass's encoder and decoder."""

    def __init__(self, env: dict[str, Any]) -> None:
        self.env = env
        self.n = 0

    def var(self, stem: str) -> str:
        self.n += 1
        return f"{stem}{self.n}"

    def const(self, value: Any, stem: str) -> str:
        name = self.var("_" + stem)
        self.env[name] = value
        return name

    # encoding: lines that append the bytes of `expr` to `out`
    def enc(self, tp: Any, expr: str, ind: str) -> list[str]:
        origin, args = get_origin(tp), get_args(tp)
        if tp is str or origin is Literal:
            b = self.var("b")
            return [f"{ind}{b} = {expr}.encode()", f"{ind}out.append(U32p(len({b})))", f"{ind}out.append({b})"]
        if tp in _SCALARS:
            s = self.const(struct.Struct("<" + _SCALARS[tp]), "s")
            return [f"{ind}out.append({s}.pack({expr}))"]
        if origin is Union and len(args) == 2 and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            v = self.var("v")
            return [
                f"{ind}{v} = {expr}",
                f"{ind}if {v} is None:",
                f"{ind}    out.append(b'\\0')",
                f"{ind}else:",
                f"{ind}    out.append(b'\\1')",
                *self.enc(inner, v, ind + "    "),
            ]
        item = _seq_item(tp)
        if item is not None:
            v, x = self.var("v"), self.var("x")
            lines = [f"{ind}{v} = {expr}", f"{ind}out.append(U32p(len({v})))"]
            if item is int:
                return lines + [f"{ind}out.append(pack(f'<{{len({v})}}q', *{v}))"]
            return lines + [f"{ind}for {x} in {v}:", *self.enc(item, x, ind + "    ")]
        if origin is tuple and args:
            v = self.var("v")
            lines = [
                f"{ind}{v} = {expr}",
                f"{ind}if len({v}) != {len(args)}:",
                f"{ind}    raise ValueError('expected {len(args)} items')",
            ]
            for i, a in enumerate(args):
                lines += self.enc(a, f"{v}[{i}]", ind)
            return lines
        if origin is dict and len(args) == 2 and args[0] is str:
            v, k, x = self.var("v"), self.var("k"), self.var("x")
            return [
                f"{ind}{v} = {expr}",
                f"{ind}out.append(U32p(len({v})))",
                f"{ind}for {k}, {x} in {v}.items():",
                *self.enc(str, k, ind + "    "),
                *self.enc(args[1], x, ind + "    "),
            ]
        if dataclasses.is_dataclass(tp):  # inlined: a call per nested value costs as much as its fields
            v = self.var("v")
            names, scalars, others, hints = _fields(tp)
            s = self.const(struct.Struct(_scalar_format(scalars, hints)), "s")
            lines = [f"{ind}{v} = {expr}"]
            if scalars:
                lines.append(f"{ind}out.append({s}.pack({''.join(f'{v}.{n}, ' for n in scalars)}))")
            for n in others:
                lines += self.enc(hints[n], f"{v}.{n}", ind)
            return lines
        raise TypeError(f"no binary encoding for type {tp!r}")

    # decoding: lines that read one value at `pos` of `buf` into `target`, advancing `pos`
    def dec(self, tp: Any, target: str, ind: str) -> list[str]:
        origin, args = get_origin(tp), get_args(tp)
        if tp is str or origin is Literal:
            n, e = self.var("n"), self.var("e")
            return [
                f"{ind}({n},) = U32u(buf, pos)",
                f"{ind}{e} = pos + 4 + {n}",
                f"{ind}if {e} > len(buf):",
                f"{ind}    raise _past_end({n})",
                f"{ind}{target} = buf[pos + 4:{e}].decode()",
                f"{ind}pos = {e}",
            ]
        if tp in _SCALARS:
            s = self.const(struct.Struct("<" + _SCALARS[tp]), "s")
            lines = [f"{ind}({target},) = {s}.unpack_from(buf, pos)", f"{ind}pos += {s}.size"]
            if tp is bool:
                lines += [
                    f"{ind}if {target} > 1:",
                    f"{ind}    raise _not_bool({target})",
                    f"{ind}{target} = {target} == 1",
                ]
            return lines
        if origin is Union and len(args) == 2 and type(None) in args:
            inner = next(a for a in args if a is not type(None))
            p = self.var("p")
            return [
                f"{ind}{p} = buf[pos]",
                f"{ind}pos += 1",
                f"{ind}if {p} == 0:",
                f"{ind}    {target} = None",
                f"{ind}elif {p} == 1:",
                *self.dec(inner, target, ind + "    "),
                f"{ind}else:",
                f"{ind}    raise _Malformed(f'a presence byte is {{{p}}}, not 0 or 1')",
            ]
        item = _seq_item(tp)
        if item is not None:
            make = "tuple" if get_origin(tp) is tuple else "list"
            n, x, i = self.var("n"), self.var("x"), self.var("i")
            size = 8 if item is int else max(1, _min_size(item))
            lines = [
                f"{ind}({n},) = U32u(buf, pos)",
                f"{ind}pos += 4",
                f"{ind}if {n} * {size} > len(buf) - pos:",
                f"{ind}    raise _too_many({n}, len(buf) - pos)",
            ]
            if item is int:
                return lines + [f"{ind}{target} = {make}(unpack_from(f'<{{{n}}}q', buf, pos))", f"{ind}pos += 8 * {n}"]
            acc = self.var("acc")
            return lines + [
                f"{ind}{acc} = []",
                f"{ind}for {i} in range({n}):",
                *self.dec(item, x, ind + "    "),
                f"{ind}    {acc}.append({x})",
                f"{ind}{target} = {make}({acc})",
            ]
        if origin is tuple and args:
            parts = [self.var("t") for _ in args]
            lines = []
            for a, v in zip(args, parts):
                lines += self.dec(a, v, ind)
            return lines + [f"{ind}{target} = ({', '.join(parts)},)"]
        if origin is dict and len(args) == 2 and args[0] is str:
            n, k, x, i, acc = self.var("n"), self.var("k"), self.var("x"), self.var("i"), self.var("acc")
            size = 4 + _min_size(args[1])
            return [
                f"{ind}({n},) = U32u(buf, pos)",
                f"{ind}pos += 4",
                f"{ind}if {n} * {size} > len(buf) - pos:",
                f"{ind}    raise _too_many({n}, len(buf) - pos)",
                f"{ind}{acc} = {{}}",
                f"{ind}for {i} in range({n}):",
                *self.dec(str, k, ind + "    "),
                *self.dec(args[1], x, ind + "    "),
                f"{ind}    {acc}[{k}] = {x}",
                f"{ind}{target} = {acc}",
            ]
        if dataclasses.is_dataclass(tp):
            return self.dec_fields(tp, target, ind)
        raise TypeError(f"no binary encoding for type {tp!r}")

    def dec_fields(self, cls: Any, target: str, ind: str, name_fields: bool = False) -> list[str]:
        """Lines that read the fields of dataclass ``cls`` and build it into ``target``; with ``name_fields``, each
        field's name is put in ``f`` before it is read (for the error of the top-level message)."""
        names, scalars, others, hints = _fields(cls)
        vs = {n: self.var("a_" + n + "_") for n in names}
        s = self.const(struct.Struct(_scalar_format(scalars, hints)), "s")
        lines = []
        if scalars:
            lines += [
                f"{ind}({''.join(vs[n] + ', ' for n in scalars)}) = {s}.unpack_from(buf, pos)",
                f"{ind}pos += {s}.size",
            ]
        for n in scalars:
            if hints[n] is bool:
                name = [f"{ind}    f = {n!r}"] if name_fields else []
                lines += [
                    f"{ind}if {vs[n]} > 1:",
                    *name,
                    f"{ind}    raise _not_bool({vs[n]})",
                    f"{ind}{vs[n]} = {vs[n]} == 1",
                ]
        for n in others:
            lines += ([f"{ind}f = {n!r}"] if name_fields else []) + self.dec(hints[n], vs[n], ind)
        return lines + [f"{ind}{target} = {self.const(cls, 'cls')}({', '.join(vs[n] for n in names)})"]


def _seq_item(tp: Any) -> Any:
    """The item type of ``tuple[T, ...]`` or ``list[T]``, else None."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    if origin is list and len(args) == 1:
        return args[0]
    return None


def _min_size(tp: Any) -> int:
    """The fewest bytes a value of ``tp`` takes (bounds item counts before anything is allocated)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp in _SCALARS:
        return struct.calcsize("<" + _SCALARS[tp])
    if origin is Union:
        return 1
    if origin is tuple and args and args[-1] is not Ellipsis:
        return sum(_min_size(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return _layout(tp).min_size  # type: ignore[arg-type]
    return 4  # str, sequences, dicts: a u32 length or count


def _type_name(tp: Any) -> str:
    """A stable name of ``tp`` for the layout id (nested dataclasses spelled out)."""
    if dataclasses.is_dataclass(tp):
        return _layout(tp).signature  # type: ignore[arg-type]
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "str"
    if origin is not None:
        name = "Optional" if origin is Union else getattr(origin, "__name__", str(origin))
        return f"{name}[{','.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return getattr(tp, "__name__", repr(tp))


def _fields(cls: Any) -> tuple[list[str], list[str], list[str], dict[str, Any]]:
    """(every field, the scalar ones, the others, type hints) of dataclass ``cls``: the layout's order."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    scalars = [n for n in names if hints[n] in _SCALARS]
    return names, scalars, [n for n in names if n not in scalars], hints


def _scalar_format(scalars: list[str], hints: dict[str, Any]) -> str:
    return "<" + "".join(_SCALARS[hints[n]] for n in scalars)


class _Layout:
    """The compiled layout of one dataclass: its scalar fields in one struct, then the others in order."""

    def __init__(self, cls: type) -> None:
        names, scalars, others, hints = _fields(cls)
        self.min_size = struct.calcsize(_scalar_format(scalars, hints)) + sum(_min_size(hints[n]) for n in others)
        self.signature = f"{cls.__name__}(" + ",".join(f"{n}:{_type_name(hints[n])}" for n in names) + ")"
        env: dict[str, Any] = {
            "U32p": _U32.pack,
            "U32u": _U32.unpack_from,
            "pack": struct.pack,
            "unpack_from": struct.unpack_from,
            "_Malformed": _Malformed,
            "_too_many": _too_many,
            "_past_end": _past_end,
            "_not_bool": _not_bool,
            "StructError": struct.error,
        }
        g = _Gen(env)
        enc = ["def encode_into(m, out):", *g.enc(cls, "m", "    ")]
        # `f` names the field being read, for the error; nested values are read inline, under their field's name
        dec = ["def decode_from(buf, pos):", "    f = 'the fixed fields'", "    try:"]
        dec += g.dec_fields(cls, "msg", "        ", name_fields=True)
        dec += [
            "    except (StructError, IndexError):",
            "        raise _Malformed(f'field {f!r}: truncated') from None",
            "    except UnicodeDecodeError:",
            "        raise _Malformed(f'field {f!r}: a string is not UTF-8') from None",
            "    except _Malformed as e:",
            "        raise _Malformed(f'field {f!r}: {e}') from None",
            "    return msg, pos",
        ]
        self.source = "\n".join(enc + dec)
        exec(compile(self.source, f"<binary header of {cls.__name__}>", "exec"), env)
        self.encode_into: Callable[[Any, list], None] = env["encode_into"]
        self.decode_from: Callable[[bytes, int], tuple[Any, int]] = env["decode_from"]


_LAYOUTS: dict[type, _Layout] = {}


def _layout(cls: type) -> _Layout:
    if cls not in _LAYOUTS:
        _LAYOUTS[cls] = _Layout(cls)
    return _LAYOUTS[cls]


# -- whole headers -------------------------------------------------------------------------------------------------
class HeaderCodec:
    """Encodes and decodes one message class's header (see the module docstring)."""

    def __init__(self, cls: type, version: int) -> None:
        self.layout = _layout(cls)
        self.kind: str = getattr(cls, "KIND", cls.__name__)
        self.version = version
        self.layout_id = zlib.crc32(self.layout.signature.encode())
        self.prefix = _PREFIX.pack(version, self.layout_id)

    def encode(self, msg: Any) -> bytes:
        out: list = [self.prefix]
        self.layout.encode_into(msg, out)
        return b"".join(out)

    def decode(self, buf: bytes) -> Any:
        if len(buf) < _PREFIX.size:
            raise TransportError(f"malformed {self.kind} message: the header is {len(buf)} bytes, under {_PREFIX.size}")
        version, layout_id = _PREFIX.unpack_from(buf, 0)
        if version != self.version:
            raise PeerRejected(
                f"protocol version mismatch: this tier speaks version {self.version}, the peer sent version "
                f"{version}; run the same aiflow version on every tier"
            )
        if layout_id != self.layout_id:
            raise PeerRejected(
                f"the peer's {self.kind} message has other fields than this tier's (layout {layout_id:08x}, "
                f"ours {self.layout_id:08x}) under the same protocol version {version}; run the same aiflow "
                f"version on every tier"
            )
        try:
            msg, end = self.layout.decode_from(buf, _PREFIX.size)
        except _Malformed as e:
            raise TransportError(f"malformed {self.kind} message: {e}") from None
        if end != len(buf):
            raise TransportError(f"malformed {self.kind} message: {len(buf) - end} bytes after the last field")
        return msg
