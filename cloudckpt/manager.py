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
from concurrent.futures import Future
from typing import Any

from .backends import resolve
from .builder import make_async_checkpointer, make_sync_checkpointer
from .checkpoint_reader import open_checkpoint
from .checkpointer import Checkpointer
from .config import CheckpointerConfig, resolve_config
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .format import MANIFEST_NAME
from .types import STATE_DICT, RankInfo, default_rank_info

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


class CheckpointManager:
    """Saves ``state_dict`` per step under ``root`` and keeps the ones retention asks for.

    ``async_save=True`` builds an async checkpointer: ``save`` returns once staging is queued,
    as ``(stage_future, commit_future)``; ``commit_future`` resolves to the URI after the
    commit, the ``latest`` hint and retention.
    """

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
    ) -> None:
        self._config = resolve_config(config)
        root = root or self._config.storage.root
        if not root:
            raise ConfigError(
                "CheckpointManager needs a root: pass root='s3://bucket/run' or set "
                "[storage] root in the config file"
            )
        for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self._options = self._config.storage.options_with(storage_options)
        self._rank_info = rank_info or default_rank_info()
        self._backend, self._root_path = resolve(
            self.root, backend=self._config.storage.backend, storage_options=self._options
        )
        self._ckpt: Checkpointer = (
            make_async_checkpointer(self._config, rank_info=self._rank_info)
            if async_save
            else make_sync_checkpointer(self._config, rank_info=self._rank_info)
        )
        self._pending: Future[str] | None = None

    def uri(self, step: int) -> str:
        """The URI of ``step``: the name found under the root (any width), else the padded one."""
        return f"{self.root}/{self._listed().get(step, step_name(step))}"

    def _listed(self) -> dict[int, str]:
        """``step -> directory name`` of every ``step-N`` directory, committed or not."""
        try:
            infos = self._backend.list_dir(self._root_path)
        except FileNotFoundError:
            return {}
        found: dict[int, str] = {}
        for info in infos:
            step = parse_step(info.name)
            if step is not None and info.is_dir and found.get(step) != step_name(step):
                found[step] = info.name  # the padded name wins over another width
        return found

    def _committed(self, name: str) -> bool:
        try:
            open_checkpoint(f"{self.root}/{name}", self._config.storage.backend, self._options)
        except CheckpointError:
            return False
        return True

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(s for s, name in self._listed().items() if self._committed(name))

    def latest_step(self) -> int | None:
        """The newest committed step (newest first, so one manifest read in the usual case)."""
        listed = self._listed()
        newest = next((s for s in sorted(listed, reverse=True) if self._committed(listed[s])), None)
        hint = self._read_hint()
        if hint is not None and hint != newest:
            logger.debug("%s/%s says %s; the manifests say %s", self.root, LATEST, hint, newest)
        return newest

    def _read_hint(self) -> int | None:
        try:
            return int(self._backend.read_bytes(self._backend.join(self._root_path, LATEST)))
        except (OSError, ValueError):
            return None

    def save(
        self, step: int, state_dict: STATE_DICT, **kwargs: Any
    ) -> str | tuple[Future[Any], Future[str]]:
        """Save and commit ``step``; then, on rank 0, the ``latest`` hint and retention.

        Sync: returns the URI once all is done. Async: ``(stage_future, commit_future)``.
        ``kwargs`` go to the checkpointer (``metadata=``, ``overwrite=``).
        """
        uri = f"{self.root}/{step_name(step)}"
        if not self.async_save:
            self._ckpt.save(uri, state_dict, storage_options=self._options, **kwargs)
            self._after_commit(step)
            return uri
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
        return stage_future, done

    def _after_commit(self, step: int) -> None:
        """Rank 0: the hint, then retention. Their failures are logged, not raised: the
        checkpoint is committed, and the next save tries again."""
        if self._rank_info.global_rank != 0:
            return
        hint = str(step).encode()
        try:
            self._backend.write_object(
                self._backend.join(self._root_path, LATEST), [hint], len(hint)
            )
        except OSError as e:
            logger.warning("could not write %s/%s: %s", self.root, LATEST, e)
        try:
            self.apply_retention()
        except (OSError, CheckpointError) as e:
            logger.warning("retention under %s failed (next save retries): %s", self.root, e)

    def apply_retention(self, dry_run: bool = False) -> list[int]:
        """Remove the committed steps that ``keep_last``/``keep_every`` do not keep; returns
        them. Uncommitted directories are never touched."""
        listed = self._listed()
        steps = sorted(s for s, name in listed.items() if self._committed(name))
        doomed = [s for s in steps if s not in retained(steps, self.keep_last, self.keep_every)]
        for s in doomed if not dry_run else ():
            logger.info("retention: removing %s/%s", self.root, listed[s])
            path = self._backend.join(self._root_path, listed[s])
            self._backend.delete(self._backend.join(path, MANIFEST_NAME))  # uncommit first
            self._backend.delete(path, recursive=True)
        return doomed

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
        """Wait for a save in flight (and its retention), then release the checkpointer."""
        self._ckpt.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
