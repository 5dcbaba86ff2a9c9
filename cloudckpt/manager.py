"""CheckpointManager: numbered checkpoints under one root, latest lookup and retention.

``<root>/step-0000000100`` for step 100 (ten digits, so names sort; any width is parsed).
Only committed checkpoints (a manifest that parses) count for ``steps()`` and ``latest_step()``;
a ``latest`` object written after each commit is a hint for other tools, always checked against
the manifests. Retention runs on rank 0 after a new commit and never touches the newest
committed checkpoint, uncommitted directories, or anything outside the root.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import CheckpointerConfig, resolve_config
from .errors import (
    BackendError,
    CheckpointError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    ConfigError,
)
from .protocol.commit import GcReport, collect_orphans, remove_checkpoint
from .protocol.committed import CommittedCheckpoint, open_checkpoint
from .protocol.records import DATA_DIR, INDEX_DIR
from .storage.interface import ObjectInfo
from .storage.registry import BackendSource, OwnedBackends, SharedBackends
from .types import STATE_DICT, RankInfo

if TYPE_CHECKING:  # the checkpointer (and torch) load with the first manager, not the command
    from .checkpointer import Checkpointer

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
LATEST = "latest"


def step_name(step: int) -> str:
    """``step-0000000100``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a step must be a non-negative int, got {step!r}")
    return f"step-{step:010d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step-<digits>`` name (any width), else ``None``."""
    m = STEP_RE.match(name)
    return int(m.group(1)) if m else None


def retained(steps: list[int], keep_last: int | None, keep_every: int | None) -> set[int]:
    """Which of the committed ``steps`` retention keeps: the ``keep_last`` newest, every
    multiple of ``keep_every``, and always the newest. ``None`` for both keeps everything."""
    if keep_last is None and keep_every is None:
        return set(steps)
    ordered = sorted(steps)
    keep = set(ordered[-keep_last:]) if keep_last else set()
    if keep_every:
        keep |= {s for s in ordered if s % keep_every == 0}
    if ordered:
        keep.add(ordered[-1])  # never the newest committed checkpoint
    return keep


class CheckpointRoot:
    """The ``step-N`` checkpoints under one root URI, without a checkpointer: listing,
    committed steps, the ``latest`` hint and removal (shared by the manager and the command)."""

    def __init__(
        self,
        root: str,
        backend_name: str | None = None,
        storage_options: dict[str, Any] | None = None,
        backends: BackendSource | None = None,
    ) -> None:
        self.root = root.rstrip("/") or root
        self.backend_name = backend_name
        self.options = dict(storage_options or {})
        self._backends = backends or SharedBackends()  # the caller's: never closed here
        self.backend, self.path = self._backends.resolve(
            self.root, backend=backend_name, storage_options=self.options
        )
        self._warned: set[str] = set()

    def uri_of(self, name: str) -> str:
        return f"{self.root}/{name}"

    def entries(self) -> list[ObjectInfo]:
        """The root's direct children. Nothing there is fine (a new root) unless the location
        could never hold a checkpoint (a missing bucket, a file): that is an error naming it."""
        try:
            infos = self.backend.list_dir(self.path)
        except FileNotFoundError:
            infos = []
        if not infos:
            self.backend.check_location(self.path)
        return infos

    def listed(self) -> dict[int, str]:
        """``step -> directory name`` of every ``step-N`` directory, committed or not."""
        found: dict[int, str] = {}
        for info in self.entries():
            step = parse_step(info.name)
            if step is not None and info.is_dir and found.get(step) != step_name(step):
                found[step] = info.name  # the padded name wins over another width
        return found

    def open_committed(self, name: str) -> CommittedCheckpoint | None:
        """The committed checkpoint ``<root>/<name>``; ``None`` if it is not committed, or if it
        is damaged (then one warning names it, and listings go on to the others). A store
        failure is raised: it says nothing about the checkpoint."""
        uri = self.uri_of(name)
        try:
            return open_checkpoint(uri, self.backend_name, self.options, backends=self._backends)
        except (CheckpointNotFoundError, CheckpointNotCommittedError):
            return None
        except BackendError:
            raise
        except Exception as e:  # a damaged manifest, whatever its parser raised
            if name not in self._warned:
                self._warned.add(name)
                logger.warning(
                    "skipping %s: its manifest is damaged (%s: %s); the other checkpoints are "
                    "still listed. Inspect it with `cloudckpt verify %s`, or remove it",
                    uri,
                    type(e).__name__,
                    str(e)[:200],
                    uri,
                )
            return None

    def committed(self, name: str) -> bool:
        """Whether ``<root>/<name>`` has a manifest that parses (a damaged one is skipped)."""
        return self.open_committed(name) is not None

    def uri(self, step: int) -> str:
        """The URI of ``step``: the name found under the root (any width), else the padded one."""
        return self.uri_of(self.listed().get(step, step_name(step)))

    def steps(self) -> dict[int, str]:
        """Committed ``step -> name``, ascending."""
        return {s: n for s, n in sorted(self.listed().items()) if self.committed(n)}

    def latest(self) -> tuple[int, str] | None:
        """The newest committed ``(step, name)`` (newest first: one manifest read usually).
        The ``latest`` hint is only compared, never trusted."""
        listed = self.listed()
        newest = next(
            ((s, listed[s]) for s in sorted(listed, reverse=True) if self.committed(listed[s])),
            None,
        )
        hint = self.read_hint()
        if hint is not None and (newest is None or hint != newest[0]):
            logger.debug("%s/%s says %s; the manifests say %s", self.root, LATEST, hint, newest)
        return newest

    def read_hint(self) -> int | None:
        try:
            return int(self.backend.read_bytes(self.backend.join(self.path, LATEST)))
        except (OSError, ValueError):
            return None

    def write_hint(self, step: int) -> None:
        data = str(step).encode()
        self.backend.write_object(self.backend.join(self.path, LATEST), [data], len(data))

    def remove(self, name: str) -> None:
        """Delete ``<root>/<name>``: the manifest first, so a crash midway leaves it
        uncommitted rather than damaged."""
        remove_checkpoint(self.backend, self.backend.join(self.path, name), self.uri_of(name))

    def collect_orphans(self, name: str, older_than: float, *, dry_run: bool = False) -> GcReport:
        """Remove the objects under ``<root>/<name>`` that its manifest does not name (all of
        them if it is uncommitted) once their save attempt is ``older_than`` seconds old; an
        uncommitted checkpoint left empty is removed."""
        path = self.backend.join(self.path, name)
        report = collect_orphans(self.backend, path, self.uri_of(name), older_than, dry_run=dry_run)
        if not report.committed and not report.kept and report.removed and not dry_run:
            # only empty directories are left (local disk); never a recursive delete here: a
            # save that starts now must not lose its first objects
            for sub in (DATA_DIR, INDEX_DIR, ""):
                d = self.backend.join(path, sub) if sub else path
                try:
                    if not self.backend.list_dir(d):
                        self.backend.delete(d)
                except OSError:
                    pass
        return report

    def retention_victims(self, keep_last: int | None, keep_every: int | None) -> dict[int, str]:
        """Committed ``step -> name`` that retention removes (never an uncommitted one)."""
        steps = self.steps()
        keep = retained(list(steps), keep_last, keep_every)
        return {s: n for s, n in steps.items() if s not in keep}


@dataclass(frozen=True)
class AsyncSave:
    """A save started by :meth:`AsyncCheckpointManager.save`: ``staged`` resolves once the
    state dict is copied (training may change it again), ``committed`` to the URI once the
    checkpoint is committed and the ``latest`` hint and retention ran (or to the save's error)."""

    step: int
    uri: str
    staged: Future[None]
    committed: Future[str]

    def result(self, timeout: float | None = None) -> str:
        """Wait for the commit; the URI, or the save's error."""
        return self.committed.result(timeout)


class _StepCheckpoints:
    """What both managers share: the root, step names, loads and retention."""

    _ASYNC = False  # whether save() stages and returns (AsyncCheckpointManager)

    def __init__(
        self,
        root: str | None = None,
        *,
        config: CheckpointerConfig | str | os.PathLike[str] | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        async_save: bool = False,
        rank_info: RankInfo | None = None,
        gc_older_than: float | None = None,
    ) -> None:
        if async_save and not self._ASYNC:
            warnings.warn(
                "CheckpointManager(async_save=True) is deprecated: use "
                "cloudckpt.AsyncCheckpointManager, whose save() returns an AsyncSave "
                "(.staged, .committed futures; .result() waits for the commit)",
                DeprecationWarning,
                stacklevel=2,
            )
        self._deprecated_async = async_save and not self._ASYNC
        async_writes = async_save or self._ASYNC
        self._config = resolve_config(config)
        root = root or self._config.storage.root
        if not root:
            raise ConfigError(
                f"{type(self).__name__} needs a root: pass root='s3://bucket/run' or set "
                "[storage] root in the config file"
            )
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(f"{name} must be an int >= 1 or None, got {value!r}")
        if gc_older_than is not None and (
            isinstance(gc_older_than, bool)
            or not isinstance(gc_older_than, (int, float))
            or not 0 <= gc_older_than < float("inf")
        ):
            raise ConfigError(f"gc_older_than must be seconds >= 0 or None, got {gc_older_than!r}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.gc_older_than = gc_older_than
        from .builder import make_async_checkpointer, make_sync_checkpointer, rank_info_for

        self._options = self._config.storage.options_with(storage_options)
        self._rank_info = rank_info_for(self._config, rank_info)
        # the manager's backends, shared by its listing and its checkpointer, closed by close()
        self._backends = OwnedBackends()
        try:
            self._dir = CheckpointRoot(
                root, self._config.storage.backend, self._options, self._backends
            )
            self.root = self._dir.root
            self._ckpt: Checkpointer = (
                make_async_checkpointer(
                    self._config, rank_info=self._rank_info, backends=self._backends
                )
                if async_writes
                else make_sync_checkpointer(
                    self._config, rank_info=self._rank_info, backends=self._backends
                )
            )
        except BaseException:
            self._backends.close()
            raise
        self._pending: Future[str] | None = None

    def uri(self, step: int) -> str:
        """The URI of ``step``: the name found under the root (any width), else the padded one."""
        return self._dir.uri(step)

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return list(self._dir.steps())

    def latest_step(self) -> int | None:
        """The newest committed step, or ``None``."""
        latest = self._dir.latest()
        return latest[0] if latest else None

    def _save_sync(self, step: int, state_dict: STATE_DICT, kwargs: dict[str, Any]) -> str:
        uri = self._dir.uri_of(step_name(step))
        kwargs.setdefault("overwrite", False)  # a committed step is never replaced silently
        self._ckpt.save(uri, state_dict, storage_options=self._options, **kwargs)
        self._after_commit(step)
        return uri

    def _save_async(self, step: int, state_dict: STATE_DICT, kwargs: dict[str, Any]) -> AsyncSave:
        uri = self._dir.uri_of(step_name(step))
        kwargs.setdefault("overwrite", False)  # a committed step is never replaced silently
        if self._pending is not None:
            self._pending.exception()  # one save in flight; its error surfaced on its future
        futures = self._ckpt.save(uri, state_dict, storage_options=self._options, **kwargs)
        assert futures is not None  # an async checkpointer returns its futures
        stage_future, write_future = futures
        done: Future[str] = Future()

        def on_written(f: Future[Any]) -> None:
            try:
                f.result()
                self._after_commit(step)
            except BaseException as e:
                done.set_exception(e)
            else:
                done.set_result(uri)

        write_future.add_done_callback(on_written)
        self._pending = done
        return AsyncSave(step, uri, stage_future, done)

    def _after_commit(self, step: int) -> None:
        """Rank 0: the hint, then retention. Their failures are logged, not raised: the
        checkpoint is committed, and the next save tries again."""
        if self._rank_info.global_rank != 0:
            return
        try:
            self._dir.write_hint(step)
        except OSError as e:
            logger.warning("could not write %s/%s: %s", self.root, LATEST, e)
        try:
            self.apply_retention()
        except (OSError, CheckpointError) as e:
            logger.warning("retention under %s failed (next save retries): %s", self.root, e)

    def apply_retention(self) -> list[int]:
        """Remove the committed steps that ``keep_last``/``keep_every`` do not keep; returns
        them. Uncommitted directories are only touched by orphan gc (``gc_older_than``)."""
        victims: dict[int, str] = {}
        if self.keep_last is not None or self.keep_every is not None:
            victims = self._dir.retention_victims(self.keep_last, self.keep_every)
        for name in victims.values():
            logger.info("retention: removing %s", self._dir.uri_of(name))
            self._dir.remove(name)
        if self.gc_older_than is not None:
            for name in set(self._dir.listed().values()) - set(victims.values()):
                report = self._dir.collect_orphans(name, self.gc_older_than)
                for g in report.removed:
                    logger.info(
                        "gc: removed %d orphan object(s) of attempt %r under %s",
                        len(g.objects),
                        g.name,
                        self._dir.uri_of(name),
                    )
        return list(victims)

    def load(self, step: int, state_dict: STATE_DICT | None = None, **kwargs: Any) -> STATE_DICT:
        """Load committed ``step`` (only ``state_dict``'s keys, in place, if given)."""
        return self._ckpt.load(self.uri(step), state_dict, storage_options=self._options, **kwargs)

    def load_latest(self, state_dict: STATE_DICT | None = None, **kwargs: Any) -> STATE_DICT:
        """Load the newest committed step; ``CheckpointNotFoundError`` if there is none."""
        step = self.latest_step()
        if step is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {self.root}; save one first or check the root"
            )
        return self.load(step, state_dict, **kwargs)

    def close(self) -> None:
        """Wait for a save in flight (and its retention), release the checkpointer, then
        close the manager's backends; an async save's error that nothing reported yet is
        raised here, once."""
        self._wait_for_retention()
        try:
            self._ckpt.close()
        finally:
            self._backends.close()

    def __exit__(self, *exc: object) -> None:
        self._wait_for_retention()
        try:
            self._ckpt.__exit__(*exc)  # leaving on an exception: a write's error is logged
        finally:
            self._backends.close()

    def _wait_for_retention(self) -> None:
        """An async save's hint and retention run in a callback of its write, which may
        still be running when the write's future has resolved: wait for them, on the
        manager's backends, before those close. Its error surfaces from ``close``."""
        if self._pending is not None:
            self._pending.exception()


class CheckpointManager(_StepCheckpoints):
    """Saves ``state_dict`` per step under ``root`` and keeps the ones retention asks for.

    ``save`` returns the URI once the checkpoint is committed; :class:`AsyncCheckpointManager`
    saves behind the caller. ``gc_older_than`` (seconds): retention also removes orphans
    (objects no manifest names: killed or lost saves) of that age under the ``step-N``
    checkpoints, as ``cloudckpt gc --older-than`` does. ``async_save=True`` is deprecated
    (use :class:`AsyncCheckpointManager`): it makes ``save`` return ``(stage_future,
    commit_future)`` as before.
    """

    def save(self, step: int, state_dict: STATE_DICT, **kwargs: Any) -> str:
        """Save and commit ``step``, then (rank 0) write the ``latest`` hint and apply
        retention; returns the checkpoint's URI. ``kwargs`` go to the checkpointer
        (``metadata=``, ``overwrite=``)."""
        if self._deprecated_async:  # the deprecated async_save=True: the pair, as before
            started = self._save_async(step, state_dict, kwargs)
            return (started.staged, started.committed)  # type: ignore[return-value]
        return self._save_sync(step, state_dict, kwargs)

    def __enter__(self) -> CheckpointManager:
        return self


class AsyncCheckpointManager(_StepCheckpoints):
    """A :class:`CheckpointManager` whose ``save`` returns once the state dict is staged;
    the write, the commit, the ``latest`` hint and retention run behind the caller (the
    thread or process writer of ``[process] writer``; see async.md). One save is in flight:
    the next ``save`` first waits for it. Its arguments are :class:`CheckpointManager`'s
    (``async_save`` changes nothing here)."""

    _ASYNC = True

    def save(self, step: int, state_dict: STATE_DICT, **kwargs: Any) -> AsyncSave:
        """Stage ``step`` now; write and commit it behind the caller. ``kwargs`` go to the
        checkpointer (``metadata=``, ``overwrite=``)."""
        return self._save_async(step, state_dict, kwargs)

    def wait_until_finished(self) -> None:
        """Wait for the save in flight (commit, hint and retention); raises its error."""
        if self._pending is not None:
            self._pending.result()

    def __enter__(self) -> AsyncCheckpointManager:
        return self
