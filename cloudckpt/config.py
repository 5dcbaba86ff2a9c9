"""``CheckpointerConfig`` and ``load_config``: one TOML file maps onto the config dataclasses.

Tables map one to one: ``[storage]`` -> :class:`StorageConfig`, ``[writer]`` ->
:class:`CheckpointWriterConfig`, ``[barrier]`` -> :class:`BarrierConfig`, ``[staging]`` ->
:class:`CheckpointStagerConfig`, ``[process]`` -> :class:`CheckpointProcessConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .barriers import BarrierConfig
from .checkpoint_process import CheckpointProcessConfig
from .checkpoint_writer import CheckpointWriterConfig
from .errors import ConfigError
from .staging import CheckpointStagerConfig
from .storage import StorageConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "CLOUDCKPT_CONFIG"


@dataclass
class CheckpointerConfig:
    """Every knob of a checkpointer, grouped as the seed groups them, plus ``storage``."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


# TOML table name -> (CheckpointerConfig field, dataclass)
SECTIONS: dict[str, tuple[str, type]] = {
    "storage": ("storage", StorageConfig),
    "writer": ("writer_config", CheckpointWriterConfig),
    "barrier": ("barrier_config", BarrierConfig),
    "staging": ("staging_config", CheckpointStagerConfig),
    "process": ("process_config", CheckpointProcessConfig),
}


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of ``key`` in ``[section]`` (for error messages)."""
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("["):
            current = s.strip("[]").strip()
            if key is None and current == section:
                return n
        elif key is not None and current == section and s.split("=", 1)[0].strip() == key:
            return n
    return None


def _build(cls: type, values: dict[str, Any], path: str, text: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            line = _line_of(text, section, key)
            raise ConfigError(
                f"{path}{f':{line}' if line else ''}: unknown key [{section}] {key}; "
                f"known keys: {sorted(fields)}"
            )
    for key, value in values.items():
        want = fields[key].type
        if isinstance(want, str) and (
            (want.startswith("int") and "str" not in want and type(value) is not int)
            or (want == "bool" and type(value) is not bool)
            or (want.startswith("dict") and not isinstance(value, dict))
        ):
            line = _line_of(text, section, key)
            raise ConfigError(
                f"{path}{f':{line}' if line else ''}: [{section}] {key} must be {want}, got "
                f"{value!r}"
            )
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: [{section}]: {e}") from e


def load_config(path: str | os.PathLike[str]) -> CheckpointerConfig:
    """Read a TOML config file into a :class:`CheckpointerConfig`.

    Raises :class:`ConfigError` naming the file, the key and what was expected.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from e
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    kwargs: dict[str, Any] = {}
    for section, value in doc.items():
        if section not in SECTIONS:
            line = _line_of(text, section, None)
            raise ConfigError(
                f"{path}{f':{line}' if line else ''}: unknown table [{section}]; known tables: "
                f"{sorted(SECTIONS)}"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {section} must be a table ([{section}])")
        attr, cls = SECTIONS[section]
        kwargs[attr] = _build(cls, value, path, text, section)
    cfg = CheckpointerConfig(**kwargs)
    if cfg.storage.backend is not None:
        from .backends import available_backends

        if cfg.storage.backend not in available_backends():
            raise ConfigError(
                f"{path}: [storage] backend = {cfg.storage.backend!r} is not installed; known: "
                f"{sorted(available_backends())}. Install its plugin (pip install "
                "cloudckpt[s3] or cloudckpt[gcs]) or remove the key to pick by URI scheme."
            )
    if cfg.barrier_config.barrier_type is not None:
        from .barriers import BARRIER_REGISTRY

        if cfg.barrier_config.barrier_type not in BARRIER_REGISTRY:
            raise ConfigError(
                f"{path}: [barrier] barrier_type = {cfg.barrier_config.barrier_type!r} is "
                f"unknown; use one of {sorted(BARRIER_REGISTRY)} or leave it out"
            )
    return cfg


def resolve_config(
    config: CheckpointerConfig | str | os.PathLike[str] | None,
) -> CheckpointerConfig:
    """``config`` itself, the file it names, ``$CLOUDCKPT_CONFIG``'s file, or the defaults."""
    if isinstance(config, CheckpointerConfig):
        return config
    if config is not None:
        return load_config(config)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return load_config(env)
    return CheckpointerConfig()
