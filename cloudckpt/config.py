"""``CheckpointerConfig`` and ``load_config``: one TOML file maps onto the config dataclasses.

Tables map one to one: ``[storage]`` -> :class:`StorageConfig`, ``[writer]`` ->
:class:`CheckpointWriterConfig`, ``[barrier]`` -> :class:`BarrierConfig`, ``[staging]`` ->
:class:`CheckpointStagerConfig`, ``[process]`` -> :class:`CheckpointProcessConfig`. Nested
tables (``[storage.options]``, ``[barrier.barrier_args]``) become the dict fields as written.
Sizes (``file_size``) take units (``"256MiB"``), durations (every ``*_secs`` key) too (``"10m"``).
Each key is declared with its type, unit, bounds and description in the dataclass's field
metadata (``config_types.setting``); :func:`validate` checks from that metadata alone, and the
reference is generated from it.

``cloudckpt config-reference`` prints the reference of every key (``docs/config-reference.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .barriers import BarrierConfig
from .config_types import (
    UNIT_SIZE,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
    check_value,
    type_names,
)
from .errors import ConfigError
from .storage.config import StorageConfig
from .units import format_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "CLOUDCKPT_CONFIG"


@dataclass(frozen=True)
class ConfigSource:
    """Where a config came from: a TOML file and its text, or Python (``path`` is ``None``)."""

    path: str | None = None
    text: str = ""

    def at(self, line: int | None) -> str:
        if self.path is None:
            return "config built in Python"
        return f"{self.path}:{line}" if line else self.path

    def where(self, section: str, key: str | None, fallback: tuple[str, str] | None = None) -> str:
        """``file:line`` of ``key`` in ``[section]`` (or of ``fallback``, or the table)."""
        line = _line_of(self.text, section, key) if self.path else None
        if line is None and fallback is not None and self.path:
            line = _line_of(self.text, *fallback)
        return self.at(line)


@dataclass
class CheckpointerConfig:
    """Every knob of a checkpointer, grouped as upstream groups them, plus ``storage``.

    ``source`` records the file it was read from (for error messages); not a setting."""

    writer_config: CheckpointWriterConfig = field(default_factory=CheckpointWriterConfig)
    barrier_config: BarrierConfig = field(default_factory=BarrierConfig)
    staging_config: CheckpointStagerConfig = field(default_factory=CheckpointStagerConfig)
    process_config: CheckpointProcessConfig = field(default_factory=CheckpointProcessConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    source: ConfigSource | None = field(default=None, repr=False, compare=False)


# TOML table name -> (CheckpointerConfig field, dataclass)
SECTIONS: dict[str, tuple[str, type]] = {
    "storage": ("storage", StorageConfig),
    "writer": ("writer_config", CheckpointWriterConfig),
    "barrier": ("barrier_config", BarrierConfig),
    "staging": ("staging_config", CheckpointStagerConfig),
    "process": ("process_config", CheckpointProcessConfig),
}


def _line_of(text: str, section: str, key: str | None) -> int | None:
    """Best-effort line number of ``key`` in ``[section]`` (or of the table header)."""
    current = ""  # top-level keys come before any table header
    header = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.split("#", 1)[0].strip()
        if s.startswith("["):
            current = s.strip("[]").strip()
            if current == section and header is None:
                header = n
            if key is not None and current == f"{section}.{key}":
                return n  # a nested table where a plain value was expected
        elif key is not None and current == section and s.split("=", 1)[0].strip() == key:
            return n
    return header


def _build(cls: type, values: dict[str, Any], source: ConfigSource, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{source.where(section, key)}: unknown key {key!r} in [{section}]; known keys: "
                f"{', '.join(sorted(fields))}"
            )
        try:
            kwargs[key] = check_value(section, fields[key], value)
        except ConfigError as e:
            raise ConfigError(f"{source.where(section, key)}: {e}") from None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source.where(section, None)}: {e}") from None


def load_config(path: str | os.PathLike[str]) -> CheckpointerConfig:
    """Read a TOML config file into a :class:`CheckpointerConfig` and :func:`validate` it.

    Raises :class:`ConfigError` naming the file, the line, the key and what was expected.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the config file ({e.strerror or e}); check the path "
            f"(--config, config= or ${CONFIG_ENV})"
        ) from e
    text = raw.decode("utf-8", errors="replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    source = ConfigSource(path, text)
    kwargs: dict[str, Any] = {}
    for section, value in doc.items():
        if section not in SECTIONS or not isinstance(value, dict):
            what = f"table [{section}]" if isinstance(value, dict) else f"top-level key {section!r}"
            line = _line_of(text, section, None) or _line_of(text, "", section)
            raise ConfigError(
                f"{source.at(line)}: unknown {what}; known tables: "
                f"{', '.join(f'[{s}]' for s in sorted(SECTIONS))}"
            )
        attr, cls = SECTIONS[section]
        kwargs[attr] = _build(cls, value, source, section)
    return validate(CheckpointerConfig(**kwargs, source=source))


def validate(cfg: CheckpointerConfig) -> CheckpointerConfig:
    """Check every key of ``cfg`` from its field metadata, then what spans keys; normalise units.

    Every entry point calls this, for files and for configs built in Python. Checks: each
    field's type, unit and range; the backend and barrier named exist; the barrier's arguments
    are ones its constructor takes; the storage options are ones the backend takes (when the
    backend is known from ``backend`` or ``root``); a process writer has shared memory.
    Raises :class:`ConfigError` naming the file and line (or "config built in Python"), the
    key and the accepted names. Returns ``cfg``.
    """
    if not isinstance(cfg, CheckpointerConfig):
        raise ConfigError(
            f"config must be a CheckpointerConfig, a TOML file path or None, got "
            f"{type(cfg).__name__}"
        )
    source = cfg.source or ConfigSource()
    for section, (attr, cls) in SECTIONS.items():
        obj: Any = getattr(cfg, attr)
        if not isinstance(obj, cls):
            raise ConfigError(
                f"{source.where(section, None)}: CheckpointerConfig.{attr} must be a "
                f"{cls.__name__}, got {type(obj).__name__}"
            )
        for f in dataclasses.fields(cls):
            try:
                value = check_value(section, f, getattr(obj, f.name))
            except ConfigError as e:
                raise ConfigError(f"{source.where(section, f.name)}: {e}") from None
            setattr(obj, f.name, value)
    _check_backend(cfg, source)
    _check_barrier(cfg, source)
    if cfg.process_config.writer == "process" and not cfg.staging_config.use_shared_memory:
        raise ConfigError(
            f"{source.where('staging', 'use_shared_memory')}: [staging] use_shared_memory = "
            'false cannot work with [process] writer = "process": the writer process reads the '
            'staged tensors from shared memory; set it to true or use writer = "thread"'
        )
    return cfg


def _check_backend(cfg: CheckpointerConfig, source: ConfigSource) -> None:
    from .storage.registry import (
        available_backends,
        backend_class_for,
        check_uri,
        describe_unknown_options,
        plugin_install_hint,
        split_scheme,
        unknown_options,
    )

    storage = cfg.storage
    if storage.backend is not None and storage.backend not in available_backends():
        raise ConfigError(
            f"{source.where('storage', 'backend')}: [storage] backend = "
            f"{storage.backend!r} is not installed; known: "
            f"{', '.join(sorted(available_backends()))}. Install "
            f"{plugin_install_hint(storage.backend)}, or remove the key to pick by URI scheme."
        )
    if storage.root:
        try:
            check_uri(storage.root)
        except ConfigError as e:
            raise ConfigError(f"{source.where('storage', 'root')}: [storage] root: {e}") from None
    if not storage.root:
        return  # the URI scheme (and so the options taken) is known only per call; checked there
    scheme = split_scheme(storage.root)
    cls = backend_class_for(storage.root, storage.backend)
    unknown, known = unknown_options(cls, scheme, storage.options)
    if unknown:
        raise ConfigError(
            f"{source.where('storage.options', unknown[0], fallback=('storage', 'options'))}: "
            f"[storage.options] {describe_unknown_options(cls, scheme, unknown, known)}"
        )


def _check_barrier(cfg: CheckpointerConfig, source: ConfigSource) -> None:
    from .barriers import BARRIER_REGISTRY, barrier_parameters

    barrier = cfg.barrier_config
    if barrier.barrier_type is None:
        if barrier.barrier_args:
            raise ConfigError(
                f"{source.where('barrier', 'barrier_args')}: [barrier.barrier_args] is set but "
                f"no barrier_type; use one of {', '.join(sorted(BARRIER_REGISTRY))}"
            )
        return
    cls = BARRIER_REGISTRY.get(barrier.barrier_type)
    if cls is None:
        raise ConfigError(
            f"{source.where('barrier', 'barrier_type')}: [barrier] barrier_type = "
            f"{barrier.barrier_type!r} is unknown; use one of "
            f"{', '.join(sorted(BARRIER_REGISTRY))} or leave it out"
        )
    known, _required = barrier_parameters(cls)
    if known is None:
        return
    for key in barrier.barrier_args:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{source.where('barrier.barrier_args', str(key), fallback=('barrier', 'barrier_args'))}: "
                f"[barrier.barrier_args] {key!r}{hint} is not an argument of {cls.__name__} "
                f"(barrier_type = {barrier.barrier_type!r}); known: {', '.join(sorted(known))}"
            )


def resolve_config(
    config: CheckpointerConfig | str | os.PathLike[str] | None,
) -> CheckpointerConfig:
    """``config`` itself, the file it names, ``$CLOUDCKPT_CONFIG``'s file, or the defaults;
    validated (:func:`validate`) in every case."""
    if isinstance(config, CheckpointerConfig):
        return validate(config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(config)
    if config is not None:
        return validate(config)  # names the wrong type
    env = os.environ.get(CONFIG_ENV)
    if env:
        return load_config(env)
    return validate(CheckpointerConfig())


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:  # pragma: no cover - every config field has a default
        return "(required)"
    if value is None:
        return "absent"
    if isinstance(value, dict):
        return "empty table" if not value else repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if f.metadata.get("unit") == UNIT_SIZE and isinstance(value, int) and value >= 1024:
        return f"{value} ({format_size(value)})"
    return str(value)


def _kind_text(f: dataclasses.Field[Any]) -> str:
    meta = f.metadata
    types: tuple[type, ...] = meta["types"]
    kind = meta.get("unit") or type_names(tuple(t for t in types if t is not type(None)))
    if meta.get("choices"):
        kind += " (" + ", ".join(f"`{c}`" for c in meta["choices"]) + ")"
    if meta.get("minimum") is not None:
        kind += f", >= {meta['minimum']:g}"
    if type(None) in types:
        kind += ", optional"
    return kind


def config_reference() -> str:
    """Markdown reference of every table and key, generated from the fields' metadata."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `cloudckpt config-reference > docs/config-reference.md`; do not edit. -->",
        "",
        "A TOML file maps onto `CheckpointerConfig` one to one: `cloudckpt.load_config(path)`, "
        "`config=` on every entry point, `--config` on the command, or `$CLOUDCKPT_CONFIG`. "
        "Sizes take `B`, `KB`, `MB`, `GB`, `TB`, `KiB`, `MiB`, `GiB`, `TiB`; durations take a "
        "number of seconds or `ms`, `s`, `m`, `h`, `d`, `w`. Every entry point validates the "
        "config the same way (`cloudckpt.config.validate`), a file or one built in Python: "
        "unknown tables or keys, wrong types, values out of range, unknown backends or "
        "barriers, barrier arguments the barrier does not take and storage options the backend "
        "does not take are a `ConfigError` naming the file, line and key and the accepted "
        "names. Reprs and error messages never show the value of a key that looks like a "
        "credential (`key`, `secret`, `token`, `password`, `credential`, `session`). "
        "Examples: `docs/examples/`.",
    ]
    for section, (attr, cls) in SECTIONS.items():
        out += [
            "",
            f"## [{section}]",
            "",
            f"`CheckpointerConfig.{attr}`: `{cls.__module__}.{cls.__name__}`.",
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        for f in dataclasses.fields(cls):
            out.append(
                f"| `{f.name}` | {_kind_text(f)} | {_default_text(f)} | {f.metadata['doc']} |"
            )
    return "\n".join(out) + "\n"


def missing_key_docs() -> list[str]:
    """Config keys declared without a description (the reference must cover all)."""
    return [
        f"[{s}] {f.name}"
        for s, (_, cls) in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if not f.metadata.get("doc")
    ]
