"""The commit and everything that removes objects: uncommit, discard, orphans and gc.

Rules (docs/architecture.md, "Commit protocol"):

- a save writes only objects whose names carry its own attempt id, so it never writes over an
  object another attempt's manifest names;
- the manifest is written last: create-only for a first save, as an atomic replace of the old
  manifest for an overwrite; the replaced checkpoint's objects are deleted only afterwards;
- after an ambiguous answer on the manifest (a lost answer, a 412 on a retry) the manifest is
  read back: if it names this attempt, the save committed;
- objects no manifest names are orphans; gc removes them once older than a given age.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import (
    BackendError,
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
)
from ..storage.interface import Backend
from ..storage.messages import describe_store_error
from .records import DATA_DIR, INDEX_DIR, MANIFEST_NAME, Manifest, attempt_dir

logger = logging.getLogger(__name__)

T = TypeVar("T")


def store_call(fn: Callable[..., T], path: str, uri: str, *args: Any, **kwargs: Any) -> T:
    """Run a backend call; a store's ``OSError`` becomes a ``BackendError`` naming the URI
    (``FileExistsError`` and ``CheckpointError`` pass through)."""
    try:
        return fn(path, *args, **kwargs)
    except (FileExistsError, CheckpointError):
        raise
    except OSError as e:
        raise BackendError(describe_store_error(uri, path, e)) from e


@dataclass
class CommitReport:
    """How a commit went: whether its outcome was learned by reading the manifest back, and
    the checkpoint it replaced (whose objects are deleted by then)."""

    readback: bool = False
    replaced: Manifest | None = None


def read_manifest(backend: Backend, root: str, uri: str) -> Manifest | None:
    """The manifest at ``root`` (``None`` if there is none); damage raises."""
    path = backend.join(root, MANIFEST_NAME)
    try:
        raw = backend.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as e:
        raise BackendError(describe_store_error(uri, path, e)) from e
    return Manifest.from_json(raw, f"{uri}/{MANIFEST_NAME}")


def _committed_attempt(backend: Backend, root: str, uri: str) -> str | None:
    """The attempt the manifest at ``root`` names now (``None``: none, or unreadable)."""
    try:
        m = read_manifest(backend, root, uri)
    except CheckpointError as e:
        logger.warning("%s: reading the manifest back failed: %s", uri, e)
        return None
    return None if m is None else m.attempt


def commit(
    backend: Backend, root: str, uri: str, manifest: Manifest, *, overwrite: bool
) -> CommitReport:
    """Write ``manifest`` so that it commits the checkpoint at ``root``.

    First save: create-only. ``overwrite``: the old manifest is replaced atomically (rename on
    local disk, a conditional PUT on the old version where the store offers one), then the old
    checkpoint's objects are deleted. Another save that committed first (or replaced the old
    manifest meanwhile) wins: this attempt's objects are removed and ``CheckpointExistsError``
    raised. An answer that is lost is settled by reading the manifest back.
    """
    path = backend.join(root, MANIFEST_NAME)
    raw = manifest.to_json()
    report = CommitReport()
    old = store_call(backend.read_version, path, uri) if overwrite else None
    try:
        if old is None:
            store_call(backend.put_create_only, path, uri, raw)
        else:
            store_call(backend.put_replace, path, uri, raw, old.version)
    except FileExistsError:
        if _committed_attempt(backend, root, uri) != manifest.attempt:
            discard(backend, root, uri, manifest_names(manifest))
            raise CheckpointExistsError(
                f"another save committed {uri} first, while this save ran; this save's objects "
                "were removed and the other save's checkpoint is kept. Save under a new name "
                "(or with overwrite=True to replace it)."
            ) from None
        report.readback = True  # our own write, answered 412 on a retry after a lost answer
    except BackendError as e:
        if _committed_attempt(backend, root, uri) != manifest.attempt:
            raise BackendError(
                f"{e} The manifest read back does not name this save: {uri} is not committed "
                "by it (its objects stay until `cloudckpt gc` removes them)."
            ) from e
        report.readback = True
        logger.info("%s: the commit's answer was lost; the manifest read back names this save", uri)
    if old is not None:
        try:
            report.replaced = Manifest.from_json(old.data, f"{uri}/{MANIFEST_NAME} (replaced)")
        except CorruptCheckpointError as e:
            logger.warning(
                "%s: the replaced manifest is damaged (%s); its objects stay as orphans", uri, e
            )
        if report.replaced is not None:
            keep = manifest_names(manifest)
            discard(backend, root, uri, manifest_names(report.replaced) - keep, best_effort=True)
    return report


def manifest_names(manifest: Manifest) -> set[str]:
    """The data and index objects a manifest names (not the manifest itself)."""
    return manifest.names() - {MANIFEST_NAME}


def discard(
    backend: Backend, root: str, uri: str, names: Iterable[str], *, best_effort: bool = False
) -> None:
    """Delete the objects ``names`` of one checkpoint or attempt: whole attempt directories for
    version-2 names (they belong to that attempt alone), one by one otherwise. The deletions
    run side by side (on an object store each is a listing and deletes: round trips, not
    work), all of them even when one fails; the first failure is raised unless
    ``best_effort``."""
    dirs: set[str] = set()
    singles: list[str] = []
    for name in names:
        d = attempt_dir(name)
        if d is not None:
            dirs.add(d)
        else:
            singles.append(name)
    jobs = [(d, True) for d in sorted(dirs)] + [(n, False) for n in singles]

    def remove(job: tuple[str, bool]) -> BackendError | None:
        rel, recursive = job
        try:
            store_call(backend.delete, backend.join(root, rel), uri, recursive=recursive)
        except BackendError as e:
            return e
        return None

    if len(jobs) > 1:
        with ThreadPoolExecutor(min(8, len(jobs)), thread_name_prefix="cloudckpt-discard") as pool:
            failures = list(pool.map(remove, jobs))
    else:
        failures = [remove(job) for job in jobs]
    for (rel, _), e in zip(jobs, failures):
        if e is None:
            continue
        if not best_effort:
            raise e
        logger.warning("%s: could not remove %s (gc removes it later): %s", uri, rel, e)


def remove_checkpoint(backend: Backend, root: str, uri: str) -> None:
    """Remove a whole checkpoint: the manifest first, so a crash midway leaves it
    uncommitted rather than damaged."""
    store_call(backend.delete, backend.join(root, MANIFEST_NAME), uri)
    store_call(backend.delete, root, uri, recursive=True)


# -- orphans ----------------------------------------------------------------------------------


@dataclass
class Orphan:
    """An object under a checkpoint that its manifest does not name."""

    rel: str  # relative to the checkpoint
    path: str  # in the backend's form
    size: int
    mtime: float | None


@dataclass
class OrphanGroup:
    """The orphans of one save attempt (``name`` = its id), or of no attempt (``name`` = "")."""

    name: str
    objects: list[Orphan] = field(default_factory=list)

    @property
    def newest(self) -> float | None:
        """The newest modification time, ``None`` if any object's age is unknown."""
        times = [o.mtime for o in self.objects]
        if not times or any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)


def _walk(backend: Backend, path: str, rel: str = "") -> Iterable[Orphan]:
    for info in backend.list_dir(path):
        sub = f"{rel}/{info.name}" if rel else info.name
        if info.is_dir:
            yield from _walk(backend, info.path, sub)
        else:
            yield Orphan(sub, info.path, info.size, info.mtime)


def list_orphans(
    backend: Backend, root: str, uri: str
) -> tuple[Manifest | None, list[OrphanGroup]]:
    """The manifest at ``root`` (``None``: uncommitted) and every object it does not name,
    grouped by save attempt. A damaged manifest raises: nothing can be told an orphan then."""
    manifest = read_manifest(backend, root, uri)
    named = manifest.names() if manifest is not None else set()
    groups: dict[str, OrphanGroup] = {}
    try:
        objects = list(_walk(backend, root))
    except OSError as e:
        raise BackendError(describe_store_error(uri, root, e)) from e
    for obj in objects:
        if obj.rel in named:
            continue
        parts = obj.rel.split("/")
        key = parts[1] if len(parts) == 3 and parts[0] in (DATA_DIR, INDEX_DIR) else ""
        groups.setdefault(key, OrphanGroup(key)).objects.append(obj)
    return manifest, sorted(groups.values(), key=lambda g: g.name)


@dataclass
class GcReport:
    """What :func:`collect_orphans` removed (or would, with ``dry_run``) and kept."""

    committed: bool
    removed: list[OrphanGroup] = field(default_factory=list)
    kept: list[OrphanGroup] = field(default_factory=list)


def collect_orphans(
    backend: Backend,
    root: str,
    uri: str,
    older_than: float,
    *,
    now: float | None = None,
    dry_run: bool = False,
) -> GcReport:
    """Remove the orphans under one checkpoint whose attempt has not changed for
    ``older_than`` seconds (an attempt in progress is younger); never a named object."""
    now = time.time() if now is None else now
    manifest, groups = list_orphans(backend, root, uri)
    report = GcReport(committed=manifest is not None)
    for g in groups:
        newest = g.newest
        if newest is None or now - newest < older_than:
            report.kept.append(g)
            continue
        report.removed.append(g)
        if dry_run:
            continue
        for obj in g.objects:
            store_call(backend.delete, obj.path, uri)
        if g.name:
            for d in (DATA_DIR, INDEX_DIR):  # empty attempt directories (local disk)
                _remove_if_empty(backend, backend.join(root, d, g.name))
    return report


def _remove_if_empty(backend: Backend, path: str) -> None:
    try:
        if not backend.list_dir(path) and backend.exists(path):
            backend.delete(path)
    except OSError:
        pass
