"""How values are encoded on storage: CRC32C, checked JSON and tree nodes, dtype tables and
safetensors headers.

The checkpoint's own records (object names, index, manifest) live in
:mod:`cloudckpt.protocol.records`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import crc32c as _crc32c

if TYPE_CHECKING:  # torch is imported where tensors are handled, so the command starts fast
    import torch

from ..errors import CorruptCheckpointError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
MAX_TREE_DEPTH = 100
"""Deepest container nesting a state-dict tree may have, on save and on load."""

_TREE_SCALARS = ("none", "bool", "int", "float", "str", "bytes")
_TREE_CONTAINERS = ("dict", "odict", "list", "tuple")
TREE_NODE_KINDS = ("tensor", "global", "replicated", *_TREE_SCALARS, *_TREE_CONTAINERS)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number this format stores")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def parse_json(raw: bytes, where: str) -> Any:
    """``raw`` parsed as JSON without ``NaN``/``Infinity`` (or numbers that overflow to them);
    a document nested too deep, or any parse failure, is :class:`CorruptCheckpointError` with
    the parser's error as ``__cause__``."""
    try:
        return json.loads(raw, parse_constant=_no_constants, parse_float=_finite_float)
    except RecursionError as e:
        raise CorruptCheckpointError(
            f"{where}: nested too deep to be a cloudckpt document; the object is damaged"
        ) from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(
            f"{where} is not valid JSON ({e}); the object is damaged. Restore it from a copy or "
            "use an earlier checkpoint."
        ) from e


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return False
    return True


def _scalar_ok(kind: str, payload: Any) -> bool:
    """Whether ``payload`` is what a scalar node of type ``kind`` holds."""
    if kind == "none":
        return payload is None
    if kind == "bool":
        return type(payload) is bool
    if kind == "int":
        return type(payload) is int
    if kind == "float":
        return type(payload) in (int, float) or payload in ("inf", "-inf", "nan")
    if kind == "str":
        return type(payload) is str
    return kind == "bytes" and type(payload) is str and _is_base64(payload)


def _tree_ok(tree: Any, n_tensors: int, n_globals: int) -> bool:
    """:func:`check_tree`'s rules without building key paths: ``True`` when the tree passes
    (the common case, fast: a tensor leaf is checked where its container lists it)."""
    stack: list[Any] = [tree]
    depths = [0]
    while stack:
        node = stack.pop()
        depth = depths.pop()
        if type(node) is not dict or len(node) != 1:
            return False
        ((kind, payload),) = node.items()
        if kind == "dict" or kind == "odict" or kind == "list" or kind == "tuple":
            if depth >= MAX_TREE_DEPTH or type(payload) is not list:
                return False
            keyed = kind == "dict" or kind == "odict"
            for child in payload:
                if keyed:
                    if type(child) is not list or len(child) != 2:
                        return False
                    k, child = child
                    if type(k) is not str and type(k) is not int:
                        return False
                if type(child) is dict and len(child) == 1 and "tensor" in child:
                    i = child["tensor"]
                    if type(i) is not int or not 0 <= i < n_tensors:
                        return False
                    continue
                stack.append(child)
                depths.append(depth + 1)
        elif kind == "tensor":
            if type(payload) is not int or not 0 <= payload < n_tensors:
                return False
        elif kind == "global":
            if type(payload) is not int or not 0 <= payload < n_globals:
                return False
        elif kind == "replicated":
            if type(payload) is not dict or len(payload) != 1:
                return False
            if next(iter(payload)) not in _TREE_SCALARS:
                return False
            stack.append(payload)
            depths.append(depth + 1)
        elif kind not in _TREE_SCALARS or not _scalar_ok(kind, payload):
            return False
    return True


def check_tree(tree: Any, n_tensors: int, where: str, n_globals: int = 0) -> None:
    """Check a stored state-dict tree without building it: known node types only, payloads of
    the right type, tensor (and global leaf) numbers in range, depth at most
    :data:`MAX_TREE_DEPTH`. What loading would refuse, raised as
    :class:`CorruptCheckpointError` naming the key path."""
    if _tree_ok(tree, n_tensors, n_globals):
        return
    stack: list[tuple[Any, str, int]] = [(tree, "", 0)]
    while stack:
        node, key, depth = stack.pop()
        at = key or "<root>"
        if not isinstance(node, dict) or len(node) != 1:
            raise CorruptCheckpointError(f"{where}: malformed tree node at {at}")
        ((kind, payload),) = node.items()
        if kind not in TREE_NODE_KINDS:
            raise CorruptCheckpointError(
                f"{where}: unknown node type {str(kind)[:40]!r} at {at}; this cloudckpt reads "
                f"{', '.join(TREE_NODE_KINDS)} (never pickles)"
            )
        ok = True
        if kind == "tensor":
            ok = type(payload) is int and 0 <= payload < n_tensors
        elif kind == "global":
            ok = type(payload) is int and 0 <= payload < n_globals
        elif kind == "replicated":  # a declared-replicated scalar: {"replicated": {"int": 7}}
            ok = (
                isinstance(payload, dict)
                and len(payload) == 1
                and next(iter(payload)) in _TREE_SCALARS
            )
            if ok:
                stack.append((payload, key, depth + 1))
        elif kind in _TREE_SCALARS:
            ok = _scalar_ok(kind, payload)
        elif depth >= MAX_TREE_DEPTH:
            raise CorruptCheckpointError(
                f"{where}: the tree is nested more than {MAX_TREE_DEPTH} deep at {at}"
            )
        elif kind in ("dict", "odict"):
            ok = type(payload) is list and all(
                type(item) is list and len(item) == 2 and type(item[0]) in (str, int)
                for item in payload
            )
            if ok:
                stack.extend(
                    (child, f"{key}.{k}" if key else str(k), depth + 1) for k, child in payload
                )
        else:
            ok = type(payload) is list
            if ok:
                stack.extend((child, f"{key}[{i}]", depth + 1) for i, child in enumerate(payload))
        if not ok:
            raise CorruptCheckpointError(f"{where}: bad {kind} value at {at}")


@functools.cache
def _numpy_dtypes() -> frozenset[torch.dtype]:
    """dtypes numpy can view directly; the others go through a uint8 view first."""
    import torch

    return frozenset(
        {
            torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        }
    )  # fmt: skip


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (the view keeps it alive)."""
    import torch

    if t.numel() == 0:
        return memoryview(bytearray(0))
    if t.requires_grad:
        t = t.detach()
    if t.dtype in _numpy_dtypes() and t.dim() > 0:
        array: Any = t.numpy()
    else:
        array = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def crc32c(data: Any, value: int = 0) -> int:
    """CRC32C of a buffer (any object with the buffer protocol), continuing from ``value``."""
    return int(_crc32c.crc32c(data, value))


_CRC32C_POLY = 0x82F63B78  # Castagnoli, bit-reflected


def _mul_mod_p(a: int, b: int) -> int:
    """``a(x) * b(x)`` modulo the CRC32C polynomial (bit-reflected: bit 31 is ``x^0``)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _CRC32C_POLY if b & 1 else b >> 1
    return p


def _shift(length: int) -> int:
    """``x^(8 * length)`` modulo the CRC32C polynomial: appending ``length`` bytes."""
    shift, square = 1 << 31, 1 << 23  # x^0; x^8 (one byte)
    while length:
        if length & 1:
            shift = _mul_mod_p(square, shift)
        length >>= 1
        if length:
            square = _mul_mod_p(square, square)
    return shift


def crc32c_concat(parts: Iterable[tuple[int, int]]) -> int:
    """CRC32C of consecutive buffers from their own ``(crc32c, length)`` pairs, without reading
    them: each step multiplies the running value by ``x^(8 * length)`` and adds the next CRC
    (zlib's ``crc32_combine``). A few integer steps per part; equal lengths share the factor."""
    value = 0
    shifts: dict[int, int] = {}
    for crc, length in parts:
        if length not in shifts:
            shifts[length] = _shift(length)
        value = _mul_mod_p(shifts[length], value) ^ crc
    return value


# -- dtypes ---------------------------------------------------------------------------------

# safetensors names and item sizes for the dtypes its readers know, by torch dtype name; other
# dtypes are stored as raw bytes ("U8"). Plain data: reading headers needs no torch.
_SAFETENSORS_DTYPE = {
    "float64": ("F64", 8),
    "float32": ("F32", 4),
    "float16": ("F16", 2),
    "bfloat16": ("BF16", 2),
    "int64": ("I64", 8),
    "int32": ("I32", 4),
    "int16": ("I16", 2),
    "int8": ("I8", 1),
    "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
    "uint16": ("U16", 2),
    "uint32": ("U32", 4),
    "uint64": ("U64", 8),
    "float8_e4m3fn": ("F8_E4M3", 1),
    "float8_e5m2": ("F8_E5M2", 1),
}
_SAFETENSORS_ITEMSIZE = dict(_SAFETENSORS_DTYPE.values())


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
    }


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    try:
        return _torch_dtypes()[name]
    except KeyError:
        raise CorruptCheckpointError(
            f"{where}: unknown dtype {name!r} (saved by a newer torch?); upgrade torch to load it"
        ) from None


# Item sizes by torch dtype name, plain data so that checking an index (cloudckpt info, verify,
# cp) needs no torch; rarer dtypes (quantized, sub-byte, fnuz) ask torch. A test keeps it equal
# to torch's own itemsize.
_ITEMSIZE = {name: size for name, (_, size) in _SAFETENSORS_DTYPE.items()} | {
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
}


PLAIN_ITEMSIZES: Mapping[str, int] = MappingProxyType(_ITEMSIZE)
"""Item sizes of the common dtypes by torch dtype name (no torch needed); :func:`dtype_itemsize`
answers for every dtype."""


def dtype_itemsize(name: str, where: str) -> int:
    """Bytes per element of the torch dtype named ``name``; unknown names are refused."""
    size = _ITEMSIZE.get(name)
    return size if size is not None else dtype_from_name(name, where).itemsize


def safetensors_entry(dtype: str, shape: tuple[int, ...], nbytes: int) -> tuple[str, list[int]]:
    """The (dtype, shape) a safetensors reader sees for a tensor of torch dtype name ``dtype``;
    unknown dtypes become a byte vector."""
    known = _SAFETENSORS_DTYPE.get(dtype)
    if known is None:
        return "U8", [nbytes]
    return known[0], list(shape)


class SafetensorsHeader:
    """A safetensors header written as text, one tensor at a time (stored back to back, in
    the order added): no per-tensor dicts and lists for the collector to scan."""

    def __init__(self) -> None:
        self._parts = ['{"__metadata__":{"format":"pt","producer":"cloudckpt"}']
        self._pos = 0

    def add(self, name: str, st_dtype: str, shape: Sequence[int], nbytes: int) -> None:
        """The next tensor: its name, safetensors dtype and shape (see
        :func:`safetensors_entry`) and its size in bytes."""
        pos = self._pos
        self._pos = pos + nbytes
        self._parts.append(
            f'{json.dumps(name)}:{{"dtype":{json.dumps(st_dtype)},'
            f'"shape":[{",".join(map(str, shape))}],"data_offsets":[{pos},{self._pos}]}}'
        )

    def to_bytes(self) -> bytes:
        """The 8-byte length and the space-padded JSON."""
        raw = (",".join(self._parts) + "}").encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw


def build_safetensors_header(entries: list[tuple[str, str, list[int], int]]) -> bytes:
    """The 8-byte length and padded JSON header for tensors stored back to back.

    ``entries`` are ``(name, st_dtype, shape, nbytes)`` in storage order.
    """
    header = SafetensorsHeader()
    for name, st_dtype, shape, nbytes in entries:
        header.add(name, st_dtype, shape, nbytes)
    return header.to_bytes()


@dataclass
class SafetensorsEntry:
    name: str
    dtype: str
    shape: list[int]
    start: int  # absolute offsets in the file
    end: int


def parse_safetensors_header(head: bytes, file_size: int, where: str) -> list[SafetensorsEntry]:
    """Validate and return a safetensors header (``head`` = at least the first 8+N bytes).

    A lying header (length past the end of the file, offsets out of range or overlapping,
    sizes that disagree with dtype and shape) is refused before anything is allocated for it.
    """
    if len(head) < 8 or file_size < 8:
        raise CorruptCheckpointError(f"{where}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(
            f"{where}: safetensors header claims {n} bytes, past the end of the "
            f"{file_size}-byte file"
        )
    if len(head) < 8 + n:
        raise CorruptCheckpointError(f"{where}: header cut short")
    header = parse_json(head[8 : 8 + n], f"{where} (safetensors header)")
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: safetensors header is not an object")
    base = 8 + n
    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (s, t) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and type(shape) is list
                and all(type(x) is int and x >= 0 for x in (*shape, s, t))
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok or dtype not in _SAFETENSORS_ITEMSIZE:
            raise CorruptCheckpointError(f"{where}: bad header entry for {name!r}")
        if s > t or base + t > file_size:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} claims bytes {s}..{t}, past the end of the file"
            )
        if math.prod(shape) * _SAFETENSORS_ITEMSIZE[dtype] != t - s:
            raise CorruptCheckpointError(f"{where}: tensor {name!r} size disagrees with its shape")
        out.append(SafetensorsEntry(name, dtype, shape, base + s, base + t))
    check_no_overlap([(x.start, x.end, x.name) for x in out], where)
    return out


def check_no_overlap(ranges: list[tuple[int, int, str]], where: str) -> None:
    """Raise if any two ``(start, end, name)`` ranges overlap."""
    prev_end, prev_name = -1, ""
    for start, end, name in sorted(ranges):
        if start < prev_end:
            raise CorruptCheckpointError(
                f"{where}: byte ranges of {prev_name!r} and {name!r} overlap"
            )
        if end > prev_end:
            prev_end, prev_name = end, name
