"""The state-dict tree: flatten nested containers into typed JSON plus a list of tensors, and back.

Containers: ``dict`` and ``OrderedDict`` (keys ``str`` or ``int``), ``list`` and ``tuple``, exactly
(:data:`CONTAINER_KINDS`); subclasses and other mappings are refused, not flattened into a type
they would not come back as. :func:`walk` applies these rules, the key-path spelling and the
depth limit for every walker of a live state dict (flatten, the stager, relocation on load).
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError, CorruptCheckpointError, UnsupportedValueError
from .format.chunks import LayoutSpec, glob_match
from .format.encoding import MAX_TREE_DEPTH
from .global_tensors import GlobalShard, MeshCache, global_shard_of, is_dtensor

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


CONTAINER_KINDS: dict[type, str] = {
    dict: "dict",
    OrderedDict: "odict",
    list: "list",
    tuple: "tuple",
}
"""The containers every walker of a state dict descends into, by exact type, with their tree
node names. Anything else is a leaf; a look-alike (a dict, list or tuple subclass such as a
``defaultdict`` or a named tuple, or another ``Mapping``) is refused, so what is saved, staged
and loaded always comes back as the type it was."""

_LOOKALIKES = (dict, list, tuple, Mapping)


def container_kind(
    value: Any, key: str, refuse: type[CheckpointError] = UnsupportedValueError
) -> str | None:
    """``"dict"``, ``"odict"``, ``"list"`` or ``"tuple"`` for a container the tree walks,
    ``None`` for a leaf; a container look-alike raises ``refuse`` naming ``key``."""
    kind = CONTAINER_KINDS.get(type(value))
    if kind is None and not isinstance(value, torch.Tensor) and isinstance(value, _LOOKALIKES):
        t = type(value)
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            how = "tuple(value), or value._asdict() for a dict"
        elif isinstance(value, (list, tuple)):
            how = f"{'list' if isinstance(value, list) else 'tuple'}(value)"
        else:
            how = "dict(value)"
        raise refuse(
            f"{key or '<root>'}: {t.__module__}.{t.__qualname__} is not a container cloudckpt "
            "walks (dict, OrderedDict, list and tuple, exactly, so every value comes back as the "
            f"type it was saved as); convert it with {how}"
        )
    return kind


def check_depth(key: str, depth: int) -> None:
    """Refuse a container nested deeper than :data:`MAX_DEPTH`."""
    if depth >= MAX_DEPTH:
        raise UnsupportedValueError(
            f"{key or '<root>'}: containers nested more than {MAX_DEPTH} deep; flatten "
            "this part of the state dict (e.g. join keys with '.')"
        )


def rebuild(kind: str, value: Any, items: list[Any]) -> Any:
    """A new container of ``value``'s kind holding ``items`` (``(key, child)`` pairs for a
    dict): :func:`walk`'s default ``build``."""
    if kind == "dict":
        return dict(items)
    if kind == "odict":
        return OrderedDict(items)
    return items if kind == "list" else tuple(items)


def rebuild_in_place(kind: str, value: Any, items: list[Any]) -> Any:
    """``value`` itself with its children replaced by ``items`` (a tuple, immutable, is made
    anew): a ``build`` for :func:`walk` that keeps the caller's dicts and lists."""
    if kind == "dict" or kind == "odict":
        for k, v in items:
            value[k] = v
        return value
    if kind == "list":
        value[:] = items
        return value
    return tuple(items)


def walk(
    value: Any,
    leaf: Callable[[Any, str], Any],
    build: Callable[[str, Any, list[Any]], Any] | None = rebuild,
    keys: bool = True,
) -> Any:
    """Visit a state dict: the one walker of live trees (save, stage, relocate, compare).

    Descends into the containers of :data:`CONTAINER_KINDS` (refusing look-alikes), at most
    :data:`MAX_DEPTH` deep, refusing reference cycles and dict keys other than ``str`` and
    ``int``; calls ``leaf(value, key)`` for everything else, with its display key path
    (:func:`child_key`), and ``build(kind, container, items)`` for every container once its
    children are visited (``items`` holds ``(key, result)`` pairs for a dict, results for a
    sequence). Returns what the root's ``leaf`` or ``build`` returned; with ``build=None``
    only the leaves are visited and ``None`` is returned. ``keys=False`` hands ``leaf`` an
    empty key (a walk that cannot fail in ``leaf`` saves building 20,000 strings); a refusal
    still names its key path.
    """
    active: set[int] = set()
    # container kind per type met in this walk, None for a leaf type already checked for
    # look-alikes: one lookup per leaf on the hot path (20,000 tensors)
    kinds: dict[type, str | None] = dict(CONTAINER_KINDS)
    unseen = "?"

    def visit(value: Any, key: str, depth: int) -> Any:
        t = type(value)
        kind = kinds.get(t, unseen)
        if kind is None:
            return leaf(value, key)
        if kind is unseen:
            kinds[t] = container_kind(value, key)  # None, or refused
            return leaf(value, key)
        check_depth(key, depth)
        if id(value) in active:
            raise UnsupportedValueError(
                f"{key or '<root>'}: the state dict contains itself (a reference cycle)"
            )
        active.add(id(value))
        depth += 1
        try:
            items: list[Any] = []
            append = items.append
            if kind == "dict" or kind == "odict":
                for k, v in value.items():
                    tk = type(k)
                    if tk is not str and tk is not int:
                        raise UnsupportedValueError(
                            f"{child_key(key, repr(k), False)}: cannot save a dict key of "
                            f"type {tk.__qualname__}; keys must be str or int"
                        )
                    ck = (f"{key}.{k}" if key else k if tk is str else str(k)) if keys else ""
                    # a leaf of a type already met is handled here, without a call of visit
                    r = leaf(v, ck) if kinds.get(type(v), unseen) is None else visit(v, ck, depth)
                    if build is not None:
                        append((k, r))
            else:
                for i, v in enumerate(value):
                    ck = f"{key}[{i}]" if keys else ""
                    append(
                        leaf(v, ck) if kinds.get(type(v), unseen) is None else visit(v, ck, depth)
                    )
        finally:
            active.discard(id(value))
        return None if build is None else build(kind, value, items)

    try:
        return visit(value, "", 0)
    except UnsupportedValueError:
        if not keys:  # the same walk with key paths raises the same refusal, named
            walk(value, _ignore, None)
        raise


def _ignore(value: Any, key: str) -> None:
    return None


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
    meshes: MeshCache = {}  # each device mesh read once per walk

    def add(leaf: TensorLeaf) -> Node:
        kind = "tensor" if leaf.shard is None else "global"
        tensors.append(leaf)
        counts[kind] += 1
        return {kind: counts[kind] - 1}

    def is_replicated(key: str) -> bool:
        return any(glob_match(key, p) for p in replicated)

    def visit_leaf(value: Any, key: str) -> Node:
        node = leaf_node(value, key)
        if replicated and next(iter(node)) in _SCALARS and is_replicated(key):
            return {"replicated": node}
        return node

    def leaf_node(value: Any, key: str) -> Node:
        t = type(value)
        if isinstance(value, GlobalShard):
            check_tensor(key, value.local)
            return add(TensorLeaf(key, value.local, value))
        if is_dtensor(value):
            shard = global_shard_of(value, key or "<root>", meshes)
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
        raise UnsupportedValueError(f"{key or '<root>'}: {_describe(value)}")

    def node(kind: str, value: Any, items: list[Any]) -> Node:
        return {kind: items}

    return walk(state_dict, visit_leaf, node), tensors


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
