"""Reading a checkpoint: manifest, one rank's index, then only the byte ranges needed.

Ranges of one file are sorted and coalesced (small gaps are read into a scratch buffer), read
in parallel straight into the destination tensors (the caller's own tensors when they fit), and
every tensor's CRC32C is checked before the call returns.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import legacy
from .errors import (
    CheckpointError,
    CheckpointNotCommittedError,
    ConfigError,
    CorruptCheckpointError,
    StateDictMismatchError,
)
from .format.encoding import PLAIN_ITEMSIZES, crc32c, dtype_from_name, tensor_bytes
from .gc_pause import freeze_survivors, paused_gc
from .global_reader import Catalog, GlobalRequest, fetch_globals, global_request, load_catalog
from .global_tensors import MeshCache, is_dtensor
from .protocol.committed import CommittedCheckpoint, open_checkpoint
from .protocol.records import RankIndex, TensorRecord
from .storage.config import StorageConfig
from .storage.registry import BackendSource, OwnedBackends
from .tree import (
    LeafMakers,
    Node,
    child_key,
    container_kind,
    node_kind,
    rebuild_in_place,
    unflatten,
    walk,
)
from .types import STATE_DICT, RankInfo
from .units import format_size

logger = logging.getLogger(__name__)

MAX_GAP = 1 << 20  # read through gaps up to this size rather than issue another request
MAX_REQUEST = 64 << 20  # split coalesced reads so large files are fetched in parallel


@dataclass
class _Reads:
    """The tensors to read, as columns (one object per load, not one per tensor): where each
    is stored and the contiguous CPU tensor its bytes go into; ``copies`` pairs such a buffer
    with the caller's tensor that could not take the bytes itself. ``shared`` marks the fresh
    small tensors made empty, to be placed in a storage shared with their neighbours in the
    file (:func:`_share`) just before their bytes are read."""

    records: list[TensorRecord] = field(default_factory=list)
    dests: list[torch.Tensor] = field(default_factory=list)
    shared: list[bool] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def add(self, record: TensorRecord, dest: torch.Tensor, shared: bool = False) -> None:
        self.records.append(record)
        self.dests.append(dest)
        self.shared.append(shared)


@dataclass
class _Unit:
    """Bytes ``start..end`` of one file read into one destination: a tensor the load was given
    or allocated alone (one position in ``_Reads``), or a run of small fresh tensors stored back
    to back that get one storage (``shared``; several positions)."""

    start: int
    end: int
    positions: list[int]
    shared: bool = False


class CheckpointReader:
    """Reads state dicts (whole, or only a target's keys) from committed checkpoints.

    Backends come from ``backends`` when given (the caller's: left open by :meth:`close`),
    else the reader opens its own and closes them in :meth:`close`."""

    def __init__(
        self,
        rank_info: RankInfo,
        *,
        storage: StorageConfig | None = None,
        concurrency: int = 8,
        backends: BackendSource | None = None,
    ) -> None:
        self._rank_info = rank_info
        self._storage = storage or StorageConfig()
        self._own_backends = backends is None
        self._backends: BackendSource = OwnedBackends() if backends is None else backends
        self._pool = ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="cloudckpt-read")

    def open(
        self, path: str, storage_options: Mapping[str, Any] | None = None
    ) -> CommittedCheckpoint:
        """Open the committed checkpoint at ``path`` (URI, plain path, or name under the root)."""
        uri = self._storage.resolve_uri(path)
        return open_checkpoint(
            uri,
            self._storage.backend,
            self._storage.options_with(dict(storage_options or {})),
            backends=self._backends,
        )

    def read(
        self,
        path: str,
        state_dict: STATE_DICT | None = None,
        *,
        map_location: Any = None,
        rank: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[STATE_DICT, list[str]]:
        """The state dict at ``path`` and the keys of ``state_dict`` the checkpoint lacks.

        With ``state_dict``, only its keys are read, into its own tensors where they fit.
        ``rank`` picks whose shard to read (default: this rank; required when the world
        size differs from the checkpoint's). Other keywords are a ``TypeError``.
        """
        if kwargs:
            raise TypeError(
                f"CheckpointReader.read() got unexpected keyword argument(s) "
                f"{', '.join(map(repr, sorted(kwargs)))}; it takes map_location, rank and "
                "storage_options"
            )
        with paused_gc():
            return self._read(path, state_dict, map_location, rank, storage_options)

    def _read(
        self,
        path: str,
        state_dict: STATE_DICT | None,
        map_location: Any,
        rank: int | None,
        storage_options: Mapping[str, Any] | None,
    ) -> tuple[STATE_DICT, list[str]]:
        started = time.monotonic()
        try:
            ckpt = self.open(path, storage_options)
        except CheckpointNotCommittedError:
            uri = self._storage.resolve_uri(path)
            backend, root = self._backends.resolve(
                uri,
                backend=self._storage.backend,
                storage_options=self._storage.options_with(dict(storage_options or {})),
            )
            if not legacy.legacy_ranks(backend, root):
                raise
            loaded = legacy.load_rank(
                backend,
                root,
                uri,
                self._rank_info.global_rank if rank is None else rank,
                map_location,
            )
            if state_dict is None:
                return loaded, []
            missing_keys: list[str] = []
            return legacy.fill(state_dict, loaded, missing_keys), missing_keys
        saved_world = ckpt.manifest.world_size
        # at another world size, global leaves reshard; per-rank leaves need an explicit rank
        other_world = rank is None and saved_world != self._rank_info.global_world_size
        if rank is None:
            rank = 0 if other_world else self._rank_info.global_rank
        index = ckpt.read_index(rank)
        freeze_survivors()
        relocate = relocation(map_location)
        align = ckpt.backend.capabilities.read_alignment
        reads = _Reads()
        dtypes: dict[str, tuple[torch.dtype, int]] = {}  # by name: dtype, _share_size
        global_requests: list[GlobalRequest] = []
        missing: list[str] = []
        per_rank: list[str] = []

        def take(i: int, key: str, target: torch.Tensor | None = None) -> torch.Tensor:
            if other_world:
                per_rank.append(key)
            if not 0 <= i < len(index.tensors):
                raise CorruptCheckpointError(f"{ckpt.uri}: tree names tensor #{i}, not in index")
            rec = index.tensors[i]
            known = dtypes.get(rec.dtype)
            if known is None:
                dt = dtype_from_name(rec.dtype, ckpt.uri)
                known = dtypes[rec.dtype] = (dt, _share_size(rec.dtype, dt))
            dtype, share = known
            if target is None:
                # shareable: small, and stored at a multiple of its item size (the index has
                # checked that its length is item size x shape)
                if share and 0 < rec.length < SHARED_MAX and rec.offset % share == 0:
                    dest = torch.empty(0, dtype=dtype)  # placed by _share before the read
                    reads.add(rec, dest, True)
                    return dest
                dest = _empty(rec, dtype, ckpt.uri, align)
                reads.add(rec, dest)
                return dest
            if is_dtensor(target):
                raise StateDictMismatchError(
                    f"{key}: the target is a DTensor but {ckpt.uri} holds a per-rank tensor "
                    "there (saved from a plain tensor); load it into a plain tensor"
                )
            if tuple(target.shape) != tuple(rec.shape) or target.dtype != dtype:
                raise StateDictMismatchError(
                    f"{key}: the target tensor is {tuple(target.shape)} {target.dtype} but "
                    f"{ckpt.uri} holds {tuple(rec.shape)} {dtype}; reshape or recast the target "
                    "to match (shape and dtype mismatches always raise)"
                )
            if target.device.type == "cpu" and target.is_contiguous():
                reads.add(rec, target)
            else:
                dest = _empty(rec, dtype, ckpt.uri)
                reads.add(rec, dest)
                reads.copies.append((dest, target))
            return target

        meshes: MeshCache = {}  # each device mesh read once per load

        def take_global(j: int, key: str, target: Any = None) -> Any:
            if not 0 <= j < len(index.globals):
                raise CorruptCheckpointError(f"{ckpt.uri}: tree names global #{j}, not in index")
            req, value = global_request(
                index.globals[j], key, target, self._rank_info.global_rank, ckpt.uri, meshes
            )
            global_requests.append(req)
            return value

        makers = LeafMakers(take, take_global, per_rank.append if other_world else None)
        if state_dict is None:
            result = unflatten(index.tree, makers, ckpt.uri)
        else:
            result = _merge(state_dict, index.tree, makers, missing, ckpt.uri)
        if per_rank:
            shown = ", ".join(per_rank[:5]) + (" ..." if len(per_rank) > 5 else "")
            raise CheckpointError(
                f"{ckpt.uri} was saved by {saved_world} rank(s) but this job has "
                f"{self._rank_info.global_world_size}: pass rank=N to load a chosen rank's "
                f"per-rank leaves ({shown}) (rank=0 for replicated state such as a DDP model), "
                "or save such leaves with replicated=[...] patterns; DTensors and replicated "
                "leaves load at any world size"
            )
        if global_requests:
            catalog: Catalog = load_catalog(ckpt, {rank: index}, self._pool)
        freeze_survivors()
        nbytes = self._fetch(ckpt, index, reads)
        if global_requests:
            nbytes += fetch_globals(ckpt, global_requests, catalog, self._pool)
        for dest, target in reads.copies:
            target.copy_(dest)
        if relocate is not None:
            result = _relocated(result, relocate)
        elapsed = time.monotonic() - started
        logger.info(
            "loaded %s rank %d: %d tensors, %s in %.2f s (%.2f GB/s)",
            ckpt.uri,
            rank,
            len(reads.records) + len(global_requests),
            format_size(nbytes),
            elapsed,
            nbytes / max(elapsed, 1e-9) / 1e9,
        )
        return result, missing

    def _fetch(self, ckpt: CommittedCheckpoint, index: RankIndex, reads: _Reads) -> int:
        """Read every tensor, coalescing per file; returns bytes read."""
        records = reads.records
        by_file: dict[int, list[int]] = {}  # positions in ``reads``, per file
        for pos, rec in enumerate(records):
            by_file.setdefault(rec.file, []).append(pos)
        jobs: list[tuple[int, list[_Unit]]] = []
        for file_no, positions in by_file.items():
            offsets = [records[p].offset for p in positions]
            if any(a > b for a, b in itertools.pairwise(offsets)):  # writers store them in order
                positions.sort(key=lambda p: records[p].offset)
            units = _units(records, reads.shared, positions)
            start, end, cut = units[0].start, units[0].start, 0
            for n, unit in enumerate(units):
                if n > cut and (unit.start - end > MAX_GAP or unit.end - start > MAX_REQUEST):
                    jobs.append((file_no, units[cut:n]))
                    start, cut = unit.start, n
                end = unit.end
            jobs.append((file_no, units[cut:]))
        futures = [self._pool.submit(self._read_group, ckpt, index, f, reads, u) for f, u in jobs]
        return sum(f.result() for f in futures)

    def _read_group(
        self,
        ckpt: CommittedCheckpoint,
        index: RankIndex,
        file_no: int,
        reads: _Reads,
        units: list[_Unit],
    ) -> int:
        """Read one coalesced range of a file into its units, then check every CRC32C."""
        rel = index.files[file_no].path
        where = ckpt.object_uri(rel)
        buffers: list[memoryview] = []
        views: list[memoryview] = []
        pos = units[0].start
        for unit in units:
            gap = unit.start - pos
            if gap > 0:
                buffers.append(memoryview(bytearray(gap)))
            if unit.shared:
                views.append(_share(reads, unit))
            else:
                views.append(tensor_bytes(reads.dests[unit.positions[0]]))
            buffers.append(views[-1])
            pos = unit.end
        offset = units[0].start
        first_key = reads.records[units[0].positions[0]].key
        ckpt.read_object(
            rel,
            lambda path: ckpt.backend.read_into(path, offset, buffers),
            "the index",
            first_key,
        )
        nbytes = 0
        for unit, view in zip(units, views):
            for p in unit.positions:
                rec = reads.records[p]
                at = rec.offset - unit.start
                if crc32c(view[at : at + rec.length] if unit.shared else view) != rec.crc32c:
                    raise CorruptCheckpointError(
                        f"{where}: CRC32C mismatch for key {rec.key} (bytes {rec.offset}.."
                        f"{rec.offset + rec.length}); the file is damaged. Load an earlier "
                        "checkpoint."
                    )
                nbytes += rec.length
        return nbytes

    def close(self) -> None:
        """Stop the reader's threads and close the backends it opened."""
        self._pool.shutdown(wait=True)
        if self._own_backends:
            self._backends.close()


def _placed(raw: torch.Tensor, rec: TensorRecord, dtype: torch.dtype) -> torch.Tensor | None:
    """``raw`` (bytes) seen as ``rec``'s dtype and shape; ``None`` where torch cannot view
    bytes so (a misaligned element, a dtype such as the quantized ones)."""
    try:
        return raw.view(dtype).view(rec.shape)
    except RuntimeError:
        return None


SHARED_MAX = 1 << 20
"""Fresh tensors below this size (and above zero) share a storage with their neighbours."""
SHARED_SPAN = 4 << 20
"""The most bytes of one file a shared storage holds: what one small tensor kept alive can pin."""
_SHARED_ALIGN = 16  # a shared storage's addresses are congruent to file offsets modulo this
#: Dtypes placed in shared storages (torch views any byte offset that is a multiple of their
#: item size); the rest (quantized, bit-packed) are allocated alone.
_SHARED_DTYPES = frozenset(PLAIN_ITEMSIZES) | {
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
}


def _share_size(name: str, dtype: torch.dtype) -> int:
    """The item size of ``dtype`` (named ``name``) if its fresh small tensors may be views of a
    shared storage, else 0 (each gets its own allocation from :func:`_empty`)."""
    return dtype.itemsize if name in _SHARED_DTYPES else 0


def _units(records: list[TensorRecord], shared: list[bool], positions: list[int]) -> list[_Unit]:
    """``positions`` (one file's, by offset) as read units: each tensor to share joins the
    shared unit before it when it starts where that one ends and the unit stays within
    ``SHARED_SPAN``; every other tensor is a unit of its own."""
    units: list[_Unit] = []
    run: _Unit | None = None
    for p in positions:
        rec = records[p]
        end = rec.offset + rec.length
        if not shared[p]:
            units.append(_Unit(rec.offset, end, [p]))
            run = None
        elif run is not None and rec.offset == run.end and end - run.start <= SHARED_SPAN:
            run.positions.append(p)
            run.end = end
        else:
            run = _Unit(rec.offset, end, [p], shared=True)
            units.append(run)
    return units


def _share(reads: _Reads, unit: _Unit) -> memoryview:
    """Allocate ``unit``'s one storage, make each of its (empty) tensors a view of its bytes,
    and return the bytes the file's ``unit.start..unit.end`` go into.

    The storage is placed so that its addresses are congruent to file offsets modulo 16: a
    tensor stored at a multiple of its item size is then aligned in memory too."""
    raw = torch.empty(unit.end - unit.start + _SHARED_ALIGN, dtype=torch.uint8)
    lead = (unit.start - raw.data_ptr()) % _SHARED_ALIGN
    storage = raw.untyped_storage()
    for p in unit.positions:
        rec = reads.records[p]
        dest = reads.dests[p]
        at = lead + rec.offset - unit.start  # a multiple of the item size (see take)
        # contiguous strides when none are given (torch's documented default; its stub
        # lists the overload with stride only)
        dest.set_(storage, at // dest.itemsize, rec.shape)  # type: ignore[call-overload]
    return tensor_bytes(raw)[lead : lead + unit.end - unit.start]


ALIGNED_MIN = 1 << 20  # tensors from this size on are placed for the backend's read_alignment


def _empty(rec: TensorRecord, dtype: torch.dtype, where: str, align: int = 0) -> torch.Tensor:
    """The destination of one stored tensor. The index has already bounded its size by the
    file it lies in (and the file's real end stops the read); an allocation the machine refuses
    means the index claims more than any real checkpoint of this job holds.

    With ``align`` (the backend's ``read_alignment``), a tensor of ``ALIGNED_MIN`` bytes or
    more is placed ``align`` bytes into a slightly larger allocation so that its address is
    congruent to its file offset: the backend then reads it without a copy (its storage is at
    most ``align`` bytes larger than the tensor)."""
    try:
        if (
            align
            and rec.length >= ALIGNED_MIN
            and rec.length == math.prod(rec.shape) * dtype.itemsize
        ):
            raw = torch.empty(rec.length + align, dtype=torch.uint8)
            shift = (rec.offset - raw.data_ptr()) % align
            placed = _placed(raw[shift : shift + rec.length], rec, dtype)
            if placed is not None:
                return placed
        return torch.empty(rec.shape, dtype=dtype)
    except (RuntimeError, MemoryError, ValueError, OverflowError) as e:
        raise CorruptCheckpointError(
            f"{where}: tensor {rec.key!r} claims shape {rec.shape[:8]} ({rec.length} bytes), "
            f"which cannot be allocated ({type(e).__name__}); the index is damaged or the "
            "checkpoint is larger than this machine's memory"
        ) from e


def _merge(
    target: Any,
    node: Node,
    makers: LeafMakers,
    missing: list[str],
    where: str,
    key: str = "",
) -> Any:
    """Fill ``target`` from ``node``, key by key; whole subtrees where the target holds None."""
    kind, payload = node_kind(node, where)
    if target is None:
        return unflatten(node, makers, where, key)
    if isinstance(target, torch.Tensor):
        if kind == "global" and makers.global_leaf is not None:
            return makers.global_leaf(int(payload), key, target)
        if kind != "tensor":
            raise StateDictMismatchError(
                f"{key or '<root>'}: the target holds a tensor but {where} holds a {kind} there"
            )
        return makers.tensor(int(payload), key, target)
    target_kind = container_kind(target, key, StateDictMismatchError)
    if target_kind == "dict" or target_kind == "odict":
        if kind not in ("dict", "odict"):
            raise StateDictMismatchError(
                f"{key or '<root>'}: the target holds a dict but {where} holds a {kind} there"
            )
        source = {k: child for k, child in payload}
        for k in list(target):
            ck = child_key(key, k, False)
            if k in source:
                target[k] = _merge(target[k], source[k], makers, missing, where, ck)
            else:
                missing.append(ck)
        return target
    if target_kind is not None:
        if kind not in ("list", "tuple"):
            raise StateDictMismatchError(
                f"{key or '<root>'}: the target holds a {type(target).__name__} but {where} "
                f"holds a {kind} there"
            )
        items = []
        for i, item in enumerate(target):
            ck = child_key(key, i, True)
            if i < len(payload):
                items.append(_merge(item, payload[i], makers, missing, where, ck))
            else:
                missing.append(ck)
                items.append(item)
        return rebuild_in_place(target_kind, target, items)
    return unflatten(node, makers, where, key)


LOCATION = "cpu"
"""Where the bytes of every stored tensor are read to: the location tag ``map_location`` sees."""


def relocation(map_location: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What loading does to each tensor for ``map_location``, in every form ``torch.load``
    takes: ``None``, a device (string, ``torch.device`` or index), a dict of location tags
    (``{"cuda:0": "cpu"}``) or a callable ``(storage, location) -> storage | None``.

    Tensors are read to host memory, so their location tag is ``"cpu"``. ``None`` when
    nothing is to be done."""
    if map_location is None:
        return None
    if isinstance(map_location, Mapping):
        target = map_location.get(LOCATION, LOCATION)
        return None if target == LOCATION else relocation(target)
    if callable(map_location) and not isinstance(map_location, (str, torch.device)):
        fn = map_location

        def call(t: torch.Tensor) -> torch.Tensor:
            out = fn(t.untyped_storage(), LOCATION)
            return t if out is None else t.to(out.device)

        return call
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(
            f"default_map_location={map_location!r} is not a device, a dict of locations or a "
            f"callable ({e}); pass what torch.load's map_location takes, e.g. 'cpu' or "
            "{'cuda:0': 'cpu'}"
        ) from None
    if device.type == "cpu":
        return None
    return lambda t: t.to(device)


def _relocated(value: Any, relocate: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every tensor relocated, its dicts and lists kept (filled in place)."""

    def leaf(value: Any, key: str) -> Any:
        return relocate(value) if isinstance(value, torch.Tensor) else value

    return walk(value, leaf, rebuild_in_place, keys=False)
