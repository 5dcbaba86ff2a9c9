"""The state-dict tree: flatten nested containers into typed JSON plus a list of tensors, and back.

Containers: ``dict`` and ``OrderedDict`` (keys ``str`` or ``int``), ``list`` and ``tuple``.
Leaves: plain strided tensors, DTensors (global leaves), and ``int``, ``float`` (inf and nan too), ``bool``, ``None``,
``str``, ``bytes``. Types come back exactly. Anything else is refused with its key path, before
a byte is written. Nothing here ever pickles.

The JSON form of a node is a one-key object naming its type, e.g. ``{"dict": [[key, node], ...]}``,
``{"list": [...]}``, ``{"tensor": 3}`` (the 4th per-rank tensor), ``{"global": 0}`` (the 1st
global leaf: a DTensor, or a plain tensor declared replicated), ``{"replicated": {"int": 7}}`` (a
non-tensor leaf declared replicated), ``{"float": "nan"}``.
"""

from __future__ import annotations

import base64
import math
import types
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnsupportedValueError
from .format.chunks import LayoutSpec, glob_match
from .format.encoding import MAX_TREE_DEPTH
from .global_tensors import GlobalShard, global_shard_of, is_dtensor

Node = dict[str, Any]

MAX_DEPTH = MAX_TREE_DEPTH
"""Deepest container nesting saved or loaded (a real state dict is rarely 10 deep); deeper is
refused before a byte is written, and a stored tree deeper than this is corruption."""

# Parameters and buffers are saved as the plain tensors they hold.
_PLAIN_TENSOR_TYPES: tuple[type, ...] = tuple(
    t for t in (torch.Tensor, torch.nn.Parameter, getattr(torch.nn, "Buffer", None)) if t
)


@dataclass
class TensorLeaf:
    """A tensor found in the tree, with its display key path (``model.layer1.weight``); for a
    global leaf, ``tensor`` is this rank's local part and ``shard`` places it."""

    key: str
    tensor: torch.Tensor
    shard: GlobalShard | None = None


def child_key(prefix: str, key: str | int, in_sequence: bool) -> str:
    """The display key path of a child: ``a.b`` for dict keys, ``a[0]`` for list items."""
    if in_sequence:
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _describe(value: Any) -> str:
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return "cannot save a function"
    if isinstance(value, type):
        return f"cannot save a class ({value.__qualname__})"
    if isinstance(value, (types.ModuleType,)):
        return "cannot save a module"
    t = type(value)
    return (
        f"cannot save a value of type {t.__module__}.{t.__qualname__}; store it as a tensor or "
        "an int, float, bool, str, bytes or None (or leave it out of the state dict)"
    )


def check_tensor(key: str, t: torch.Tensor) -> None:
    """Refuse tensors that have no plain strided host-copyable data."""
    if type(t) not in _PLAIN_TENSOR_TYPES:
        raise UnsupportedValueError(
            f"{key}: cannot save a tensor subclass {type(t).__qualname__}; save a plain tensor "
            "(for a DTensor, its .to_local() shard)"
        )
    if t.is_meta:
        raise UnsupportedValueError(
            f"{key}: cannot save a tensor on the meta device (it has no data); materialize it first"
        )
    if t.layout != torch.strided:
        raise UnsupportedValueError(
            f"{key}: cannot save a tensor with layout {t.layout}; convert it with .to_dense() first"
        )
    if t.is_quantized:
        raise UnsupportedValueError(
            f"{key}: cannot save a quantized tensor ({t.dtype}); save t.dequantize() or its "
            "int_repr() and scales"
        )


def flatten(
    state_dict: Any, replicated: Sequence[str] = (), world_size: int = 1
) -> tuple[Node, list[TensorLeaf]]:
    """The typed JSON tree of ``state_dict`` and its tensors in visit order.

    DTensors (and staged :class:`GlobalShard` s) become global leaves; plain leaves whose key
    path matches a ``replicated`` glob pattern are declared the same on all ``world_size``
    ranks. Per-rank tensors and global leaves are numbered apart in the tree.
    """
    tensors: list[TensorLeaf] = []
    counts = {"tensor": 0, "global": 0}
    active: set[int] = set()

    def add(leaf: TensorLeaf) -> Node:
        kind = "tensor" if leaf.shard is None else "global"
        tensors.append(leaf)
        counts[kind] += 1
        return {kind: counts[kind] - 1}

    def is_replicated(key: str) -> bool:
        return any(glob_match(key, p) for p in replicated)

    def visit(value: Any, key: str, depth: int = 0) -> Node:
        node = visit_value(value, key, depth)
        if replicated and next(iter(node)) in _SCALARS and is_replicated(key):
            return {"replicated": node}
        return node

    def visit_value(value: Any, key: str, depth: int) -> Node:
        t = type(value)
        if isinstance(value, GlobalShard):
            check_tensor(key, value.local)
            return add(TensorLeaf(key, value.local, value))
        if is_dtensor(value):
            shard = global_shard_of(value, key or "<root>")
            check_tensor(key, shard.local)
            return add(TensorLeaf(key, shard.local, shard))
        if isinstance(value, torch.Tensor):
            check_tensor(key, value)
            if replicated and is_replicated(key):
                layout = LayoutSpec.replicated(tuple(value.shape), world_size)
                return add(TensorLeaf(key, value, GlobalShard(layout, value, "replicated")))
            return add(TensorLeaf(key, value))
        if value is None:
            return {"none": None}
        if t is bool:
            return {"bool": value}
        if t is int:
            return {"int": value}
        if t is float:
            return {"float": value if math.isfinite(value) else repr(value)}
        if t is str:
            return {"str": value}
        if t is bytes:
            return {"bytes": base64.b64encode(value).decode("ascii")}
        if t in (dict, OrderedDict, list, tuple):
            if depth >= MAX_DEPTH:
                raise UnsupportedValueError(
                    f"{key or '<root>'}: containers nested more than {MAX_DEPTH} deep; flatten "
                    "this part of the state dict (e.g. join keys with '.')"
                )
            if id(value) in active:
                raise UnsupportedValueError(
                    f"{key or '<root>'}: the state dict contains itself (a reference cycle)"
                )
            active.add(id(value))
            try:
                if t is dict or t is OrderedDict:
                    items = []
                    for k, v in value.items():
                        if type(k) not in (str, int):
                            raise UnsupportedValueError(
                                f"{child_key(key, repr(k), False)}: cannot save a dict key of "
                                f"type {type(k).__qualname__}; keys must be str or int"
                            )
                        items.append([k, visit(v, child_key(key, k, False), depth + 1)])
                    return {"odict" if t is OrderedDict else "dict": items}
                children = [
                    visit(v, child_key(key, i, True), depth + 1) for i, v in enumerate(value)
                ]
                return {"list" if t is list else "tuple": children}
            finally:
                active.discard(id(value))
        raise UnsupportedValueError(f"{key or '<root>'}: {_describe(value)}")

    return visit(state_dict, ""), tensors


_SCALARS = {"none", "bool", "int", "float", "str", "bytes"}


def _decode_scalar(kind: str, raw: Any) -> Any:
    if kind == "none":
        return None
    if kind == "bool" and type(raw) is bool:
        return raw
    if kind == "int" and type(raw) is int:
        return raw
    if kind == "float":
        if type(raw) in (int, float):
            return float(raw)
        if raw in ("inf", "-inf", "nan"):
            return float(raw)
    if kind == "str" and type(raw) is str:
        return raw
    if kind == "bytes" and type(raw) is str:
        return base64.b64decode(raw)
    raise ValueError(f"bad {kind} value {raw!r}")


def node_kind(node: Any, where: str) -> tuple[str, Any]:
    """The type tag and payload of a JSON node; a malformed node is corruption."""
    if not isinstance(node, dict) or len(node) != 1:
        raise CorruptCheckpointError(f"{where}: malformed tree node {str(node)[:80]!r}")
    ((kind, payload),) = node.items()
    return kind, payload


@dataclass
class LeafMakers:
    """How :func:`unflatten` makes leaves: ``tensor(i, key)`` per-rank tensor ``i``,
    ``global_leaf(j, key)`` global leaf ``j``; ``per_rank(key)`` hears of every per-rank
    non-tensor leaf."""

    tensor: Callable[..., Any]  # (i, key) and, when filling a target, (i, key, target)
    global_leaf: Callable[..., Any] | None = None
    per_rank: Callable[[str], None] | None = None


def unflatten(
    node: Node,
    tensor: Callable[[int, str], Any] | LeafMakers,
    where: str,
    key: str = "",
    depth: int = 0,
) -> Any:
    """Rebuild the value of ``node``; ``tensor(i, key)`` supplies tensor ``i`` (or a
    :class:`LeafMakers` supplies every kind of leaf)."""
    makers = tensor if isinstance(tensor, LeafMakers) else LeafMakers(tensor)
    kind, payload = node_kind(node, where)
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(
            f"{where}: the tree is nested more than {MAX_DEPTH} deep at {key or '<root>'}"
        )
    try:
        if kind == "tensor":
            return makers.tensor(int(payload), key)
        if kind == "global" and makers.global_leaf is not None:
            return makers.global_leaf(int(payload), key)
        if kind in _SCALARS:
            if makers.per_rank is not None:
                makers.per_rank(key)
            return _decode_scalar(kind, payload)
        if kind == "replicated":
            inner, value = node_kind(payload, where)
            if inner in _SCALARS:
                return _decode_scalar(inner, value)
        if kind in ("dict", "odict"):
            out: dict[Any, Any] = OrderedDict() if kind == "odict" else {}
            for k, child in payload:
                out[k] = unflatten(child, makers, where, child_key(key, k, False), depth + 1)
            return out
        if kind in ("list", "tuple"):
            items = [
                unflatten(c, makers, where, child_key(key, i, True), depth + 1)
                for i, c in enumerate(payload)
            ]
            return items if kind == "list" else tuple(items)
    except (TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{where}: bad value at {key or '<root>'}: {e}") from e
    raise CorruptCheckpointError(f"{where}: unknown node type {kind!r} at {key or '<root>'}")
