"""Global tensors as boxes: where each rank's chunk sits, who writes it, what a reader needs.

Plain data and integer arithmetic only (no torch), so every rank computes the same answers
without talking to the others, and the ``cloudckpt`` command can read the records.

- A *placement spec* (:class:`LayoutSpec`) is a DTensor's global shape, its device mesh (the
  global ranks, row-major, and the mesh's shape) and one placement per mesh dimension:
  :class:`ShardOn` (``Shard(dim)``, torch.chunk sizes: uneven splits give the last ranks less,
  maybe nothing) or :data:`REPLICATE`.
- :meth:`LayoutSpec.boxes` gives every rank's :class:`Box` (global offsets and sizes); ranks
  whose boxes are equal *hold* the same chunk.
- :func:`assign_writers` picks exactly one writer per distinct chunk: chunks are grouped by their
  holder set, and within a group the biggest go first to the least-loaded holder. Every holder
  sees the same group (a holder holds every chunk of its group), so the choice needs no message.
- :func:`read_pieces` plans a load: for a target box, the stored chunks that intersect it and,
  within each, the rows (dimension 0) to read, widened to whole checksum blocks.
- :class:`GlobalRecord` / :class:`ChunkRecord`: how a rank's index records a global leaf and the
  chunks of it that this rank wrote, with one CRC32C per block of rows.
"""

from __future__ import annotations

import fnmatch
import heapq
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError

CRC_BLOCK_BYTES = 1 << 20
"""Target bytes per checksum block of a stored chunk: a partial read verifies whole blocks."""


# -- geometry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """A hyper-rectangle of a global tensor: ``offsets[d] <= i < offsets[d] + sizes[d]``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def empty(self) -> bool:
        return any(s == 0 for s in self.sizes)

    def intersect(self, other: Box) -> Box | None:
        """The common part, or ``None`` when it is empty."""
        offs, sizes = [], []
        for a, n, b, m in zip(self.offsets, self.sizes, other.offsets, other.sizes):
            lo, hi = max(a, b), min(a + n, b + m)
            if hi <= lo:
                return None
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offs), tuple(sizes))

    def relative_to(self, outer: Box) -> tuple[slice, ...]:
        """Slices selecting this box inside ``outer``'s local coordinates."""
        return tuple(
            slice(o - oo, o - oo + s) for o, s, oo in zip(self.offsets, self.sizes, outer.offsets)
        )


@dataclass(frozen=True)
class ShardOn:
    """``Shard(dim)``: the mesh dimension splits tensor dimension ``dim`` (torch.chunk sizes)."""

    dim: int


@dataclass(frozen=True)
class Replicate:
    """``Replicate()``: every rank along the mesh dimension holds the same data."""


REPLICATE = Replicate()
Placement = ShardOn | Replicate


def shard_range(length: int, parts: int, index: int) -> tuple[int, int]:
    """``(offset, size)`` of part ``index`` of ``parts`` along a dimension of ``length``, as
    ``Shard`` cuts it: parts of ``ceil(length / parts)``, the last ones short or empty."""
    full = -(-length // parts) if parts else 0
    start = min(full * index, length)
    return start, min(length, start + full) - start


@dataclass(frozen=True)
class LayoutSpec:
    """How a global tensor is laid out over a device mesh (plain data, the same on every rank)."""

    shape: tuple[int, ...]
    mesh_ranks: tuple[int, ...]  # the mesh's global ranks, row-major
    mesh_shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    order: tuple[int, ...] = ()  # mesh dims in the order they shard; () = left to right

    def __post_init__(self) -> None:
        if self.order and sorted(self.order) != list(range(len(self.mesh_shape))):
            raise ValueError(f"order {self.order} is not a permutation of the mesh dims")
        if math.prod(self.mesh_shape) != len(self.mesh_ranks):
            raise ValueError(f"mesh shape {self.mesh_shape} does not hold {len(self.mesh_ranks)}")
        if len(self.placements) != len(self.mesh_shape):
            raise ValueError("one placement per mesh dimension is needed")
        for p in self.placements:
            if isinstance(p, ShardOn) and not 0 <= p.dim < len(self.shape):
                raise ValueError(f"Shard({p.dim}) of a {len(self.shape)}-d tensor")

    def coordinate(self, rank: int) -> tuple[int, ...]:
        """``rank``'s coordinate in the mesh."""
        pos = rank - self.mesh_ranks[0] if self.mesh_ranks else -1
        if not 0 <= pos < len(self.mesh_ranks) or self.mesh_ranks[pos] != rank:
            pos = self.mesh_ranks.index(rank)  # not a run of consecutive ranks: search
        return self._coordinate_at(pos)

    def _coordinate_at(self, pos: int) -> tuple[int, ...]:
        """The mesh coordinate of position ``pos`` in ``mesh_ranks``."""
        coord = []
        for n in reversed(self.mesh_shape):
            coord.append(pos % n)
            pos //= n
        return tuple(reversed(coord))

    def box_at(self, coord: Sequence[int]) -> Box:
        """The chunk held at mesh coordinate ``coord``: shards applied in ``order`` (left to
        right, as DTensor does, unless FSDP2 over TP sharded right to left); two mesh dims
        sharding one tensor dim split it again."""
        offsets, sizes = [0] * len(self.shape), list(self.shape)
        for mesh_dim in self.order or range(len(self.placements)):
            p = self.placements[mesh_dim]
            if isinstance(p, ShardOn):
                off, size = shard_range(sizes[p.dim], self.mesh_shape[mesh_dim], coord[mesh_dim])
                offsets[p.dim] += off
                sizes[p.dim] = size
        return Box(tuple(offsets), tuple(sizes))

    def box_of(self, rank: int) -> Box:
        return self.box_at(self.coordinate(rank))

    def boxes(self) -> dict[int, Box]:
        """Every mesh rank's chunk."""
        return {r: self.box_at(self._coordinate_at(p)) for p, r in enumerate(self.mesh_ranks)}

    def holders(self, rank: int) -> tuple[int, ...]:
        """The ranks holding the same chunk as ``rank`` (sorted; ``rank`` among them).

        At most linear in the ranks, not quadratic: two ranks whose coordinates differ along a
        sharding mesh dim get disjoint parts there, so a non-empty chunk is held exactly by the
        ranks that share ``rank``'s coordinate on every sharding dim (any coordinate on the
        replicating dims). Empty chunks (uneven splits) are grouped by box instead.
        """
        coord = self.coordinate(rank)
        mine = self.box_at(coord)
        if mine.empty:
            return self.holders_by_box()[mine]
        strides = _row_major_strides(self.mesh_shape)
        base = sum(
            c * s for c, s, p in zip(coord, strides, self.placements) if isinstance(p, ShardOn)
        )
        free = [
            (n, s)
            for n, s, p in zip(self.mesh_shape, strides, self.placements)
            if not isinstance(p, ShardOn)
        ]
        if not free:
            return (rank,)
        *outer, (n_last, s_last) = free
        starts = [base]
        for n, s in outer:
            starts = [q + i * s for q in starts for i in range(n)]
        ranks: list[int] = []
        for q in starts:  # the last replicating dim: a strided slice of the mesh
            ranks.extend(self.mesh_ranks[q : q + n_last * s_last : s_last])
        return tuple(sorted(ranks))

    def holders_by_box(self) -> dict[Box, tuple[int, ...]]:
        """Every distinct chunk of the mesh and its holders (sorted), in one pass."""
        groups: dict[Box, list[int]] = {}
        for rank, box in self.boxes().items():
            groups.setdefault(box, []).append(rank)
        return {box: tuple(sorted(ranks)) for box, ranks in groups.items()}

    @classmethod
    def replicated(cls, shape: Sequence[int], world_size: int) -> LayoutSpec:
        """A plain tensor identical on all ``world_size`` ranks."""
        return cls(tuple(shape), tuple(range(world_size)), (world_size,), (REPLICATE,))


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Position steps per dimension of a row-major array of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# -- who writes what ------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkItem:
    """A chunk some rank holds: its leaf, box, size and the ranks holding it."""

    key: str
    box: Box
    nbytes: int
    holders: tuple[int, ...]


def assign_writers(items: Iterable[ChunkItem]) -> dict[tuple[str, Box], int]:
    """The one rank that writes each distinct ``(key, box)``.

    Within each holder set, biggest chunks first (ties by key and offsets), each to the holder
    with the least bytes so far (ties: the lowest rank). Deterministic: every holder of a chunk
    computes the same writer from the chunks it holds itself.
    """
    groups: dict[tuple[int, ...], dict[tuple[str, Box], ChunkItem]] = {}
    for it in items:
        groups.setdefault(it.holders, {})[(it.key, it.box)] = it
    out: dict[tuple[str, Box], int] = {}
    for holders, chunks in groups.items():
        # (bytes so far, rank) of every holder; the smallest pair is the writer (a sorted list
        # is already a heap), so a chunk costs log(holders), not a scan of them
        load = [(0, r) for r in sorted(set(holders))]
        for ident, it in sorted(
            chunks.items(), key=lambda kv: (-kv[1].nbytes, kv[0][0], kv[0][1].offsets)
        ):
            written, writer = load[0]
            heapq.heapreplace(load, (written + it.nbytes, writer))
            out[ident] = writer
    return out


# -- replicated plain leaves ----------------------------------------------------------------


_INDEX = re.compile(r"\[([^\]]*)\]")


def key_parts(key: str) -> list[str]:
    """A display key path as components: ``optim.state[0].step`` -> ``optim, state, 0, step``."""
    return [p for p in _INDEX.sub(r".\1", key).split(".") if p != ""]


def glob_match(key: str, pattern: str) -> bool:
    """Whether key path ``key`` matches ``pattern``: ``*`` (and ``?``, ``[...]``) within one
    component, ``**`` any number of components, as torchsnapshot's ``replicated=`` spells it."""
    return _match(key_parts(key), key_parts(pattern) if pattern != "**" else ["**"])


def _match(parts: list[str], pat: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(parts[i:], pat[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(parts[1:], pat[1:])


def check_patterns(patterns: object, where: str) -> tuple[str, ...]:
    """``patterns`` as a tuple of strings, or ``ValueError`` naming ``where``."""
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise ValueError(
            f"{where} must be a list of glob patterns over key paths (e.g. ['**'] or "
            f"['optim.state.*.step']), got {patterns!r}"
        )
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{where}: every pattern must be a non-empty string, got {p!r}")
    return tuple(patterns)


# -- reading --------------------------------------------------------------------------------


def block_rows(row_bytes: int) -> int:
    """Rows per checksum block for rows of ``row_bytes``: about :data:`CRC_BLOCK_BYTES`."""
    return max(1, CRC_BLOCK_BYTES // max(1, row_bytes))


@dataclass(frozen=True)
class ReadPiece:
    """Part of one stored chunk a reader needs: rows ``first_row..last_row`` of the chunk
    (whole checksum blocks ``first_block..last_block``, exclusive ends) and the box they fill."""

    chunk: int  # position in the list given to read_pieces
    box: Box  # the intersection, in global coordinates
    first_block: int
    end_block: int
    first_row: int  # of the chunk, where the read starts (block aligned)
    end_row: int  # of the chunk, where the read ends


def read_pieces(target: Box, stored: Sequence[tuple[Box, int]]) -> list[ReadPiece]:
    """For each stored ``(box, rows_per_block)`` intersecting ``target``, the rows to read."""
    out = []
    for n, (box, per_block) in enumerate(stored):
        inter = target.intersect(box)
        if inter is None:
            continue
        if not box.sizes:  # a 0-d tensor: one "row"
            out.append(ReadPiece(n, inter, 0, 1, 0, 1))
            continue
        lo = inter.offsets[0] - box.offsets[0]
        hi = lo + inter.sizes[0]
        first, end = lo // per_block, -(-hi // per_block)
        out.append(
            ReadPiece(n, inter, first, end, first * per_block, min(box.sizes[0], end * per_block))
        )
    return out


def uncovered(target: Box, boxes: Sequence[Box]) -> Box | None:
    """A part of ``target`` that none of ``boxes`` covers (``None`` when fully covered).

    Counts elements: stored chunks never overlap, so covered volume equals target volume
    exactly when the target is covered.
    """
    covered = sum(i.numel for b in boxes if (i := target.intersect(b)) is not None)
    if covered == target.numel:
        return None
    return target


# -- index records --------------------------------------------------------------------------


def _row(row: Any, n: int, what: str, where: str) -> list[Any]:
    if not isinstance(row, list) or len(row) < n:
        raise CorruptCheckpointError(f"{where}: malformed {what} row {str(row)[:80]!r}")
    return row[:n]


def _int(x: Any, where: str) -> int:
    if type(x) is not int:
        raise CorruptCheckpointError(f"{where}: expected an integer in a global leaf, got {x!r}")
    return x


def _ints(xs: Any, where: str) -> list[int]:
    if not isinstance(xs, list):
        raise CorruptCheckpointError(f"{where}: expected a list of integers, got {str(xs)[:80]!r}")
    return [_int(x, where) for x in xs]


@dataclass
class ChunkRecord:
    """A stored chunk of a global leaf: the tensor record holding its bytes (position in the
    rank's ``tensors``), its box and one CRC32C per ``block_rows`` rows."""

    tensor: int
    offsets: list[int]
    sizes: list[int]
    block_rows: int
    crcs: list[int]

    @property
    def box(self) -> Box:
        return Box(tuple(self.offsets), tuple(self.sizes))

    def to_row(self) -> list[Any]:
        return [self.tensor, self.offsets, self.sizes, self.block_rows, self.crcs]

    @classmethod
    def from_row(cls, row: Any, where: str) -> ChunkRecord:
        t, o, s, b, c = _row(row, 5, "a chunk", where)
        return cls(
            _int(t, where), _ints(o, where), _ints(s, where), _int(b, where), _ints(c, where)
        )


GLOBAL_KINDS = ("dtensor", "replicated")


@dataclass
class GlobalRecord:
    """A leaf stored once for all ranks: its key, dtype, global shape, kind (``dtensor`` or a
    ``replicated`` plain tensor) and the chunks of it this rank wrote (maybe none)."""

    key: str
    dtype: str
    shape: list[int]
    kind: str
    chunks: list[ChunkRecord] = field(default_factory=list)

    def to_row(self) -> list[Any]:
        return [self.key, self.dtype, self.shape, self.kind, [c.to_row() for c in self.chunks]]

    @classmethod
    def from_row(cls, row: Any, where: str) -> GlobalRecord:
        """Parse an index row; anything malformed is a :class:`CorruptCheckpointError`."""
        k, d, s, kind, chunks = _row(row, 5, "a global leaf", where)
        if not all(isinstance(x, str) for x in (k, d, kind)) or not isinstance(chunks, list):
            raise CorruptCheckpointError(f"{where}: malformed global leaf row {str(row)[:80]!r}")
        return cls(k, d, _ints(s, where), kind, [ChunkRecord.from_row(c, where) for c in chunks])

    def validate(self, where: str, tensors: Sequence[Any]) -> None:
        """Chunks inside the global shape and agreeing with their tensor records (each of which
        has ``dtype`` and ``shape``), checksum blocks counted right."""
        if self.kind not in GLOBAL_KINDS:
            raise CorruptCheckpointError(f"{where}: global leaf {self.key!r} of kind {self.kind!r}")
        if any(n < 0 for n in self.shape):
            raise CorruptCheckpointError(f"{where}: global leaf {self.key!r} has a negative size")
        for c in self.chunks:
            ok = (
                0 <= c.tensor < len(tensors)
                and len(c.offsets) == len(c.sizes) == len(self.shape)
                and all(
                    o >= 0 and s >= 0 and o + s <= n
                    for o, s, n in zip(c.offsets, c.sizes, self.shape)
                )
                and c.block_rows >= 1
            )
            if ok:
                rec = tensors[c.tensor]
                rows = c.sizes[0] if c.sizes else 1
                ok = (
                    rec.dtype == self.dtype
                    and list(rec.shape) == c.sizes
                    and len(c.crcs) == -(-rows // c.block_rows)
                )
            if not ok:
                raise CorruptCheckpointError(
                    f"{where}: a chunk of global leaf {self.key!r} (offsets {c.offsets}, sizes "
                    f"{c.sizes}) does not fit its shape {self.shape} or its tensor record"
                )
