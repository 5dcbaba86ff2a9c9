"""``CheckpointerConfig`` and ``load_config``: one TOML file maps onto the config dataclasses.

Tables map one to one: ``[storage]`` -> :class:`StorageConfig`, ``[writer]`` ->
:class:`CheckpointWriterConfig`, ``[barrier]`` -> :class:`BarrierConfig`, ``[staging]`` ->
:class:`CheckpointStagerConfig`, ``[process]`` -> :class:`CheckpointProcessConfig`. Nested
tables (``[storage.options]``, ``[barrier.barrier_args]``) become the dict fields as written.
Sizes (``file_size``) take units (``"256MiB"``), durations (every ``*_secs`` key) too (``"10m"``).

``cloudckpt config-reference`` prints the reference of every key (``docs/config-reference.md``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from .barriers import BarrierConfig
from .config_types import (
    WRITER_KINDS,
    CheckpointProcessConfig,
    CheckpointStagerConfig,
    CheckpointWriterConfig,
)
from .errors import ConfigError
from .storage import StorageConfig
from .utils import parse_duration, parse_size

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

SIZE_KEYS = {("writer", "file_size"), ("staging", "max_staging_bytes")}
"""Keys that are sizes: bytes or a string with units."""

# What each key does, for the generated reference. A test fails if a field has no entry here.
KEY_DOCS: dict[tuple[str, str], str] = {
    ("storage", "backend"): "Registered backend name (`local`, `fsspec`, `s3`, `gcs`, ...). "
    "Absent: the URI's scheme decides.",
    ("storage", "root"): "URI that relative checkpoint names resolve against; the "
    "`CheckpointManager` root and the command's default ROOT.",
    ("storage", "options"): "Table `[storage.options]`: handed to the backend (fsspec storage "
    "options, e.g. `endpoint_url`). A call's `storage_options=` / `--storage-option` wins.",
    ("writer", "write_barrier_timeout_secs"): "How long ranks wait for each other at the commit "
    "barrier.",
    ("writer", "file_size"): "Target size of one data file; tensors are packed into files of "
    "about this size (a larger tensor gets its own file).",
    ("writer", "concurrency"): "Data files uploaded (and byte ranges read) at once per rank.",
    ("writer", "replicated"): "Glob patterns over key paths (`*` one component, `**` any) of "
    "plain leaves that are the same on every rank (DDP models, step counters): stored once, "
    'loadable at any world size. `["**"]`: every plain leaf. DTensors are always stored once.',
    ("barrier", "barrier_type"): "`tcp_store` or `dist_barrier`; absent: none for one process, "
    "the process group's store when one is initialized.",
    ("barrier", "barrier_args"): "Table `[barrier.barrier_args]`: constructor arguments of the "
    "barrier (e.g. `master_address`, `tcpstore_port`).",
    ("staging", "use_pinned_memory"): "Stage into pinned host memory (needs an accelerator).",
    ("staging", "use_shared_memory"): "Stage into shared memory when the writer is a process "
    "(required then; a thread writer never needs it).",
    ("staging", "max_staging_bytes"): "Upper bound on the host memory staging may hold (a size); "
    "a save that would need more fails at once with a `StagingError`. Absent: no bound.",
    ("staging", "use_async_staging"): "Stage in a background thread; `save` returns at once.",
    ("staging", "use_non_blocking_copy"): "Non-blocking device-to-host copies (needs an "
    "accelerator).",
    ("process", "subprocess_init_timeout_secs"): "How long the background writer may take to "
    "start.",
    ("process", "subprocess_shutdown_timeout_secs"): "How long closing waits for the background "
    "writer.",
    ("process", "writer"): "`thread` (a background thread of the training process) or `process` "
    "(a persistent writer process fed through shared memory; uploads never hold the trainer's "
    "GIL).",
}


def is_duration_key(key: str) -> bool:
    """Keys ending in ``_secs`` are durations: seconds or a string with units."""
    return key.endswith("_secs")


def _where(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line else path


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


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether ``value`` fits a field annotation such as ``int``, ``str | None``, ``dict[...]``."""
    for alt in (a.strip() for a in annotation.split("|")):
        base = alt.split("[", 1)[0]
        if (
            (base == "None" and value is None)
            or (base == "bool" and type(value) is bool)
            or (base == "int" and type(value) is int)
            or (base == "float" and type(value) in (int, float))
            or (base == "str" and isinstance(value, str))
            or (base == "dict" and isinstance(value, dict))
            or (base == "list" and isinstance(value, list))
            or base == "Any"
        ):
            return True
    return False


def _convert(section: str, key: str, value: Any, annotation: str) -> Any:
    """Check one value's type and parse units; ``ValueError`` says what was expected."""
    if (section, key) in SIZE_KEYS:
        if isinstance(value, dict):
            raise ValueError(f"expected a size like 268435456 or '256MiB', got a table {value!r}")
        return parse_size(value)
    if is_duration_key(key):
        if isinstance(value, dict):
            raise ValueError(f"expected a duration like 600 or '10m', got a table {value!r}")
        seconds = parse_duration(value)
        return int(seconds) if seconds == int(seconds) else seconds
    if not _type_ok(value, annotation):
        raise ValueError(f"expected {annotation}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], path: str, text: str, section: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{_where(path, _line_of(text, section, key))}: unknown key {key!r} in "
                f"[{section}]; known keys: {', '.join(sorted(fields))}"
            )
        try:
            kwargs[key] = _convert(section, key, value, str(fields[key].type))
        except ValueError as e:
            raise ConfigError(
                f"{_where(path, _line_of(text, section, key))}: [{section}] {key}: {e}"
            ) from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_where(path, _line_of(text, section, None))}: [{section}]: {e}") from e


def load_config(path: str | os.PathLike[str]) -> CheckpointerConfig:
    """Read a TOML config file into a :class:`CheckpointerConfig`.

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
    kwargs: dict[str, Any] = {}
    for section, value in doc.items():
        if section not in SECTIONS or not isinstance(value, dict):
            what = f"table [{section}]" if isinstance(value, dict) else f"top-level key {section!r}"
            raise ConfigError(
                f"{_where(path, _line_of(text, section, None) or _line_of(text, '', section))}: "
                f"unknown {what}; known tables: "
                f"{', '.join(f'[{s}]' for s in sorted(SECTIONS))}"
            )
        attr, cls = SECTIONS[section]
        kwargs[attr] = _build(cls, value, path, text, section)
    cfg = CheckpointerConfig(**kwargs)
    _check_names(cfg, path, text)
    return cfg


def _check_names(cfg: CheckpointerConfig, path: str, text: str) -> None:
    """The backend and barrier named must exist."""
    if cfg.storage.backend is not None:
        from .backends import available_backends

        if cfg.storage.backend not in available_backends():
            raise ConfigError(
                f"{_where(path, _line_of(text, 'storage', 'backend'))}: [storage] backend = "
                f"{cfg.storage.backend!r} is not installed; known: "
                f"{', '.join(sorted(available_backends()))}. Install its plugin (pip install "
                "cloudckpt[s3] or cloudckpt[gcs]) or remove the key to pick by URI scheme."
            )
    if cfg.barrier_config.barrier_type is not None:
        from .barriers import BARRIER_REGISTRY

        if cfg.barrier_config.barrier_type not in BARRIER_REGISTRY:
            raise ConfigError(
                f"{_where(path, _line_of(text, 'barrier', 'barrier_type'))}: [barrier] "
                f"barrier_type = {cfg.barrier_config.barrier_type!r} is unknown; use one of "
                f"{', '.join(sorted(BARRIER_REGISTRY))} or leave it out"
            )
    if cfg.process_config.writer not in WRITER_KINDS:
        raise ConfigError(
            f"{_where(path, _line_of(text, 'process', 'writer'))}: [process] writer = "
            f"{cfg.process_config.writer!r} is not a writer kind; use one of "
            f"{', '.join(WRITER_KINDS)}"
        )


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
    return str(value)


def config_reference() -> str:
    """Markdown reference of every table and key, generated from the dataclasses."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `cloudckpt config-reference > docs/config-reference.md`; do not edit. -->",
        "",
        "A TOML file maps onto `CheckpointerConfig` one to one: `cloudckpt.load_config(path)`, "
        "`config=` on every entry point, `--config` on the command, or `$CLOUDCKPT_CONFIG`. "
        "Sizes take `B`, `KB`, `MB`, `GB`, `TB`, `KiB`, `MiB`, `GiB`, `TiB`; durations (keys "
        "ending in `_secs`) take a number of seconds or `ms`, `s`, `m`, `h`, `d`, `w`. Unknown "
        "tables or keys, wrong types and unknown backends or barriers are a `ConfigError` naming "
        "the file, line and key. Examples: `docs/examples/`.",
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
            kind = str(f.type)
            if (section, f.name) in SIZE_KEYS:
                kind = "size"
            elif is_duration_key(f.name):
                kind = "duration"
            elif kind.startswith("dict"):
                kind = "table"
            kind = kind.replace(" | None", ", optional").replace(" | ", " or ")
            doc = KEY_DOCS.get((section, f.name), "")
            out.append(f"| `{f.name}` | {kind} | {_default_text(f)} | {doc} |")
    return "\n".join(out) + "\n"


def missing_key_docs() -> list[str]:
    """Config keys without an entry in :data:`KEY_DOCS` (the reference must cover all)."""
    return [
        f"[{s}] {f.name}"
        for s, (_, cls) in SECTIONS.items()
        for f in dataclasses.fields(cls)
        if (s, f.name) not in KEY_DOCS
    ]
