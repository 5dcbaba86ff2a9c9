"""The geometry of global leaves: chunks per rank, holders, writers, read plans, patterns."""

from __future__ import annotations

import math

import pytest
import torch

from cloudckpt.checkpoint_writer import block_checksums
from cloudckpt.format import crc32c, crc32c_concat, tensor_bytes
from cloudckpt.format.chunks import (
    REPLICATE,
    Box,
    ChunkItem,
    LayoutSpec,
    ShardOn,
    assign_writers,
    block_rows,
    check_patterns,
    glob_match,
    read_pieces,
    shard_range,
)


def test_shard_range_follows_torch_chunk_sizes() -> None:
    for length in range(0, 13):
        for parts in range(1, 6):
            sizes = [shard_range(length, parts, i)[1] for i in range(parts)]
            expected = [c.shape[0] for c in torch.arange(length).chunk(parts)]
            expected += [0] * (parts - len(expected))
            assert sizes == expected, (length, parts)
            assert sum(sizes) == length


def test_boxes_of_a_1d_mesh_uneven_shard() -> None:
    spec = LayoutSpec((10, 3), (0, 1, 2, 3), (4,), (ShardOn(0),))
    assert [spec.box_of(r) for r in range(4)] == [
        Box((0, 0), (3, 3)),
        Box((3, 0), (3, 3)),
        Box((6, 0), (3, 3)),
        Box((9, 0), (1, 3)),
    ]
    assert spec.holders(2) == (2,)


def test_boxes_of_a_2d_mesh_match_torch() -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    cases = [
        ((ShardOn(0), REPLICATE), (Shard(0), Replicate())),
        ((REPLICATE, ShardOn(1)), (Replicate(), Shard(1))),
        ((ShardOn(0), ShardOn(0)), (Shard(0), Shard(0))),
        ((ShardOn(1), ShardOn(0)), (Shard(1), Shard(0))),
    ]
    for ours, theirs in cases:
        for shape in [(7, 5), (8, 10), (1, 3), (0, 4)]:
            spec = LayoutSpec(shape, (0, 1, 2, 3), (2, 2), ours)
            for rank in range(4):
                coord = list(spec.coordinate(rank))
                size, offset = _compute_local_shape_and_global_offset(shape, (2, 2), coord, theirs)
                box = spec.box_of(rank)
                assert box.sizes == tuple(size), (ours, shape, rank)
                if not box.empty:
                    assert box.offsets == tuple(offset), (ours, shape, rank)


def test_holders_of_replicated_dims() -> None:
    spec = LayoutSpec((8, 4), (10, 11, 12, 13), (2, 2), (ShardOn(0), REPLICATE))
    assert spec.coordinate(12) == (1, 0)
    assert spec.holders(10) == (10, 11) and spec.holders(13) == (12, 13)
    assert LayoutSpec.replicated((3,), 3).holders(1) == (0, 1, 2)


def test_each_chunk_gets_one_writer_balanced_by_load() -> None:
    everyone = (0, 1, 2, 3)
    items = [
        ChunkItem(f"k{i}", Box((0,), (n,)), n, everyone) for i, n in enumerate([8, 4, 4, 2, 2])
    ]
    items.append(ChunkItem("solo", Box((0,), (100,)), 100, (2,)))
    writers = assign_writers(items)
    assert writers[("solo", Box((0,), (100,)))] == 2  # a single holder always writes its own
    got = {it.key: writers[(it.key, it.box)] for it in items[:5]}
    assert got == {"k0": 0, "k1": 1, "k2": 2, "k3": 3, "k4": 3}
    # any holder computes the same answer from the chunks it holds, in any order
    assert assign_writers(reversed(items)) == writers


def test_replicated_chunk_written_once_over_a_2d_mesh() -> None:
    spec = LayoutSpec((8, 4), (0, 1, 2, 3), (2, 2), (ShardOn(0), REPLICATE))
    per_rank = {}
    for rank in range(4):
        box = spec.box_of(rank)
        item = ChunkItem("w", box, box.numel * 4, spec.holders(rank))
        per_rank[rank] = assign_writers([item])[("w", box)]
    assert per_rank == {0: 0, 1: 0, 2: 2, 3: 2}


def _holders_by_scan(spec: LayoutSpec, rank: int) -> tuple[int, ...]:
    """The definition: every rank whose box equals ``rank``'s."""
    mine = spec.box_of(rank)
    return tuple(sorted(r for r, b in spec.boxes().items() if b == mine))


def _writers_by_scan(items: list[ChunkItem]) -> dict[tuple[str, Box], int]:
    """The plain greedy: per holder set, biggest chunk first to the least-loaded holder."""
    groups: dict[tuple[int, ...], dict[tuple[str, Box], ChunkItem]] = {}
    for it in items:
        groups.setdefault(it.holders, {})[(it.key, it.box)] = it
    out = {}
    for holders, chunks in groups.items():
        load = dict.fromkeys(holders, 0)
        for ident, it in sorted(
            chunks.items(), key=lambda kv: (-kv[1].nbytes, kv[0][0], kv[0][1].offsets)
        ):
            writer = min(holders, key=lambda r: (load[r], r))
            load[writer] += it.nbytes
            out[ident] = writer
    return out


def test_holders_equal_the_ranks_holding_an_equal_box() -> None:
    """Every kind of layout (uneven and empty chunks, two mesh dims on one tensor dim, right to
    left order, shuffled ranks): the holders are exactly the ranks with the same box."""
    g = torch.Generator().manual_seed(7)
    placements = [REPLICATE, ShardOn(0), ShardOn(1)]
    for case in range(300):
        ndim = 1 + case % 3
        mesh_shape = tuple(int(n) for n in torch.randint(1, 5, (ndim,), generator=g))
        ranks = tuple(int(r) for r in torch.randperm(math.prod(mesh_shape), generator=g))
        shape = tuple(int(n) for n in torch.randint(0, 9, (2,), generator=g))
        ours = tuple(placements[int(i)] for i in torch.randint(0, 3, (ndim,), generator=g))
        order = tuple(int(d) for d in torch.randperm(ndim, generator=g)) if case % 2 else ()
        spec = LayoutSpec(shape, ranks, mesh_shape, ours, order)
        for rank in ranks:
            assert spec.holders(rank) == _holders_by_scan(spec, rank), (spec, rank)
        by_box = spec.holders_by_box()
        assert sorted(r for h in by_box.values() for r in h) == sorted(ranks)
        assert all(spec.holders(h[0]) == h for h in by_box.values())


def test_writers_equal_the_plain_greedy_assignment() -> None:
    g = torch.Generator().manual_seed(3)
    groups = [(0, 1, 2, 3), (2,), (4, 5), (1, 3, 5, 7, 9), tuple(range(16))]
    for _ in range(50):
        items = []
        for n in range(int(torch.randint(1, 40, (1,), generator=g))):
            holders = groups[int(torch.randint(0, len(groups), (1,), generator=g))]
            size = int(torch.randint(1, 6, (1,), generator=g)) * 8  # many ties
            items.append(ChunkItem(f"k{n % 7}", Box((n,), (size,)), size, holders))
        assert assign_writers(items) == _writers_by_scan(items)


@pytest.mark.parametrize("side", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_thousands_of_ranks_write_every_chunk_once_balanced(side: int) -> None:
    """A 32x32 (and, slow, 64x64) mesh, ``Shard(0)`` x ``Replicate``: every rank plans alone
    (its own chunks and their holders, as the writer does); every chunk gets one writer, the one
    all its holders agree on, and bytes written per rank differ by at most one chunk."""
    spec_of = {
        f"layer{n}.w": LayoutSpec(
            (side * rows, 16), tuple(range(side * side)), (side, side), (ShardOn(0), REPLICATE)
        )
        for n, rows in enumerate([9, 1, 4, 7, 2, 2, 5, 3, 8] * 8)
    }
    planned: dict[tuple[str, Box], set[int]] = {}
    load = dict.fromkeys(range(side * side), 0)
    biggest = 0
    for rank in range(side * side):
        items = []
        for key, spec in spec_of.items():
            box = spec.box_of(rank)
            items.append(ChunkItem(key, box, box.numel * 4, spec.holders(rank)))
        for (key, box), writer in assign_writers(items).items():
            planned.setdefault((key, box), set()).add(writer)
            if writer == rank:
                load[rank] += box.numel * 4
                biggest = max(biggest, box.numel * 4)
    every_chunk = {(k, b) for k, spec in spec_of.items() for b in spec.holders_by_box()}
    assert set(planned) == every_chunk and len(every_chunk) == side * len(spec_of)
    assert all(len(writers) == 1 for writers in planned.values())  # holders agree
    written = sum(load.values())
    assert written == sum(math.prod(s.shape) * 4 for s in spec_of.values())  # each chunk once
    assert max(load.values()) - min(load.values()) <= biggest
    assert min(load.values()) > 0  # 72 chunks per `side` holders: everyone writes


def test_read_pieces_take_only_intersecting_rows_in_whole_blocks() -> None:
    stored = [(Box((0, 0), (100, 8)), 10), (Box((100, 0), (50, 8)), 10)]
    pieces = read_pieces(Box((95, 2), (20, 3)), stored)
    assert [(p.chunk, p.first_row, p.end_row, p.first_block, p.end_block) for p in pieces] == [
        (0, 90, 100, 9, 10),
        (1, 0, 20, 0, 2),
    ]
    assert pieces[0].box == Box((95, 2), (5, 3)) and pieces[1].box == Box((100, 2), (15, 3))
    assert read_pieces(Box((150, 0), (0, 8)), stored) == []
    assert block_rows(1 << 21) == 1 and block_rows(1024) == 1024


def test_read_pieces_of_a_0d_tensor() -> None:
    (p,) = read_pieces(Box((), ()), [(Box((), ()), 1)])
    assert (p.first_row, p.end_row, p.box) == (0, 1, Box((), ()))


@pytest.mark.parametrize(
    ("key", "pattern", "hit"),
    [
        ("model.layer1.weight", "**", True),
        ("model.layer1.weight", "model.*", False),
        ("model.layer1.weight", "model.**", True),
        ("model.layer1.weight", "model.*.weight", True),
        ("optim.state[0].step", "optim.state.*.step", True),
        ("optim.state[0].step", "**.step", True),
        ("step", "**.step", True),
        ("steps", "step", False),
        ("sched.lr", "sched", False),
    ],
)
def test_glob_patterns_over_key_paths(key: str, pattern: str, hit: bool) -> None:
    assert glob_match(key, pattern) is hit


def test_patterns_must_be_a_list_of_strings() -> None:
    with pytest.raises(ValueError, match=r"replicated must be a list of glob patterns .*'\*\*'"):
        check_patterns("**", "replicated")
    with pytest.raises(ValueError, match="every pattern must be a non-empty string, got 3"):
        check_patterns(["a", 3], "replicated")


def test_strided_shard_boxes_match_torch() -> None:
    """FSDP2 over TP: ``(_StridedShard(0, sf=2), Shard(0))`` shards right to left."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    for rows in (8, 16, 4, 7, 10, 5, 3):
        shape = (rows, 3)
        spec = LayoutSpec(shape, (0, 1, 2, 3), (2, 2), (ShardOn(0), ShardOn(0)), order=(1, 0))
        theirs = (_StridedShard(0, split_factor=2), Shard(0))
        boxes = set()
        for rank in range(4):
            size, offset = _compute_local_shape_and_global_offset(
                shape, (2, 2), list(spec.coordinate(rank)), theirs
            )
            box = spec.box_of(rank)
            assert (box.sizes, box.offsets) == (tuple(size), tuple(offset)), (rows, rank)
            boxes.add(box)
        assert sum(b.numel for b in boxes) == rows * 3


@pytest.mark.parametrize("sizes", [[], [0], [7], [0, 5, 0], [1, 1, 1], [1 << 20, 1 << 20, 1234]])
def test_crc32c_concat_equals_the_crc_of_the_joined_bytes(sizes: list[int]) -> None:
    g = torch.Generator().manual_seed(len(sizes))
    bufs = [
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes() for n in sizes
    ]
    assert crc32c_concat((crc32c(b), len(b)) for b in bufs) == crc32c(b"".join(bufs))


@pytest.mark.parametrize(
    "shape", [(), (0, 4), (3, 0), (5, 7), (2 * (1 << 18) + 3, 1), ((1 << 18) + 1, 2)]
)
def test_block_checksums_and_the_whole_crc_in_one_pass(shape: tuple[int, ...]) -> None:
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    view = tensor_bytes(t)
    per_block, crcs, whole = block_checksums(view, shape, 4)
    assert whole == crc32c(view)
    rows = shape[0] if shape else 1
    assert len(crcs) == -(-rows // per_block)
    step = per_block * (math.prod(shape[1:]) * 4 if shape else 4)
    for b, crc in enumerate(crcs):
        assert crc == crc32c(view[b * step : (b + 1) * step])
