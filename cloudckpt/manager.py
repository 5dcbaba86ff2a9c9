"""CheckpointManager: numbered checkpoints under one root, latest lookup and retention.

``<root>/step-0000000100`` for step 100 (ten digits, so names sort; any width is parsed).
Only committed checkpoints (a manifest that parses) count for ``steps()`` and ``latest_step()``;
a ``latest`` object written after each commit is a hint, always checked against the manifest.
Retention runs on rank 0 after a new commit and never touches the newest committed checkpoint,
uncommitted directories, or anything outside the root.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from .backends import resolve
from .builder import make_sync_checkpointer
from .checkpoint_reader import open_checkpoint
from .config import CheckpointerConfig, resolve_config
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError
from .types import STATE_DICT, RankInfo, default_rank_info

logger = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
LATEST = "latest"


def step_name(step: int) -> str:
    """``step-0000000100``."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"a step must be a non-negative int, got {step!r}")
    return f"step-{step:010d}"


class CheckpointManager:
    """Saves ``state_dict`` per step under ``root`` and keeps the ones retention asks for."""

    def __init__(
        self,
        root: str | None = None,
        *,
        config: CheckpointerConfig | str | os.PathLike[str] | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        storage_options: dict[str, Any] | None = None,
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
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self._options = self._config.storage.options_with(storage_options)
        self._rank_info = rank_info or default_rank_info()
        self._backend, self._root_path = resolve(
            self.root, backend=self._config.storage.backend, storage_options=self._options
        )
        self._ckpt = make_sync_checkpointer(self._config, rank_info=self._rank_info)

    def uri(self, step: int) -> str:
        return f"{self.root}/{step_name(step)}"

    def _committed(self, step: int) -> bool:
        try:
            open_checkpoint(self.uri(step), self._config.storage.backend, self._options)
        except CheckpointError:
            return False
        return True

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        found = []
        for info in self._backend.list_dir(self._root_path):
            m = STEP_RE.match(info.name)
            if m and info.is_dir and self._committed(int(m.group(1))):
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The newest committed step; the ``latest`` hint first, verified, else a listing."""
        try:
            hint = int(self._backend.read_bytes(self._backend.join(self._root_path, LATEST)))
        except (OSError, ValueError):
            hint = None
        steps = self.steps()
        if hint is not None and steps and hint == steps[-1]:
            return hint
        return steps[-1] if steps else None

    def save(self, step: int, state_dict: STATE_DICT, **kwargs: Any) -> str:
        """Save and commit step ``step``; then, on rank 0, the hint and retention."""
        uri = self.uri(step)
        self._ckpt.save(uri, state_dict, storage_options=self._options, **kwargs)
        if self._rank_info.global_rank == 0:
            latest = str(step).encode()
            self._backend.write_object(
                self._backend.join(self._root_path, LATEST), [latest], len(latest)
            )
            self._apply_retention()
        return uri

    def _apply_retention(self) -> None:
        if self.keep_last is None and self.keep_every is None:
            return
        steps = self.steps()
        keep = set(steps[-(self.keep_last or len(steps)) :]) if self.keep_last else set(steps)
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        if steps:
            keep.add(steps[-1])  # never the newest committed checkpoint
        for s in steps:
            if s not in keep:
                logger.info("retention: removing %s", self.uri(s))
                path = self._backend.join(self._root_path, step_name(s))
                self._backend.delete(self._backend.join(path, "manifest.json"))  # uncommit first
                self._backend.delete(path, recursive=True)

    def load(self, step: int, state_dict: STATE_DICT | None = None, **kwargs: Any) -> STATE_DICT:
        return self._ckpt.load(self.uri(step), state_dict, storage_options=self._options, **kwargs)

    def load_latest(self, state_dict: STATE_DICT | None = None, **kwargs: Any) -> STATE_DICT:
        step = self.latest_step()
        if step is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {self.root}; save one first or check the root"
            )
        return self.load(step, state_dict, **kwargs)

    def close(self) -> None:
        self._ckpt.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
