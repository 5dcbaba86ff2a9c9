"""The knobs of the writer, the stager and the writer process, as dataclasses, and the field
metadata every config dataclass declares its keys with.

A leaf module: free of torch and of the layers that use these, so the config file loader
(``config.py``) and the command read them without importing torch, and the writer, stager and
writer process import them without importing the API layer. The modules that use them
(``checkpoint_writer``, ``staging``, ``checkpoint_process``) re-export them.

Each field is declared with :func:`setting`: its accepted types, its unit (a size or a
duration), its bounds and a one-line description. :func:`check_fields` checks and normalises
an instance from that metadata alone; ``config.validate`` runs it on every section, and the
config reference is generated from the same metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .format.chunks import check_patterns
from .units import parse_duration, parse_size

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")
"""A key whose name contains one of these holds a secret: its value is never shown."""

MASK = "***"


def is_secret_key(key: object) -> bool:
    """Whether a config or storage option key looks like it holds a credential."""
    name = str(key).lower()
    return any(word in name for word in SECRET_WORDS)


def masked(value: Any) -> Any:
    """``value`` with the values of secret-looking keys replaced by ``***`` (nested too)."""
    if isinstance(value, Mapping):
        return {k: MASK if is_secret_key(k) else masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(masked(v) for v in value)
    return value


def shown(key: str, value: Any) -> str:
    """How an error message may show ``value`` of ``key``: its type only when the key looks
    secret or the value is a table or a long string, else its repr."""
    kind = type(value).__name__
    if is_secret_key(key) or isinstance(value, (Mapping, list, tuple)):
        return f"a {kind}"
    text = repr(value)
    if isinstance(value, str) and ("=" in value or len(text) > 60):
        return f"a {kind}"  # 'k=v' text may carry a credential
    return f"{kind} {text}"


UNIT_SIZE = "size"
UNIT_DURATION = "duration"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    types: tuple[type, ...],
    unit: str | None = None,
    minimum: float | None = None,
    choices: tuple[str, ...] | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A config dataclass field with the metadata :func:`check_fields` and the reference use.

    ``types``: the accepted Python types (``bool`` is never an ``int``; an ``int`` is a
    ``float``); ``unit``: ``"size"`` or ``"duration"`` (parsed from strings such as ``"1GiB"``
    or ``"10m"``); ``minimum``: the smallest accepted number; ``choices``: the accepted strings.
    """
    metadata = {"doc": doc, "types": types, "unit": unit, "minimum": minimum, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _fits(value: Any, types: tuple[type, ...]) -> bool:
    for t in types:
        if t is type(None) and value is None:
            return True
        if t is bool and type(value) is bool:
            return True
        if t is int and type(value) is int:
            return True
        if t is float and type(value) in (int, float):
            return True
        if t not in (bool, int, float, type(None)) and isinstance(value, t):
            return True
    return False


def type_names(types: tuple[type, ...]) -> str:
    names = {type(None): "absent", dict: "table", str: "string", bool: "boolean"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def check_value(section: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """``value`` checked against ``f``'s metadata and normalised (units parsed); a
    ``ConfigError`` names the key, what is accepted and what was given (never a secret)."""
    meta = f.metadata
    types: tuple[type, ...] = meta["types"]
    unit = meta.get("unit")
    where = f"[{section}] {f.name}"
    if unit is not None and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            example = "268435456 or '256MiB'" if unit == UNIT_SIZE else "600 or '10m'"
            raise ConfigError(
                f"{where}: expected a {unit} like {example}, got {shown(f.name, value)}"
            )
        try:
            if unit == UNIT_SIZE:
                if isinstance(value, float):
                    raise ValueError(f"expected a whole number of bytes or a string, got {value!r}")
                value = parse_size(value)
            else:
                seconds = parse_duration(value)
                value = int(seconds) if seconds == int(seconds) else seconds
        except (ValueError, OverflowError) as e:
            raise ConfigError(f"{where}: {e}") from None
    elif not _fits(value, types):
        # a table's key never shows the value: it may be credentials typed inline
        got = f"a {type(value).__name__}" if dict in types else shown(f.name, value)
        raise ConfigError(f"{where}: expected {type_names(types)}, got {got}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    minimum = meta.get("minimum")
    if minimum is not None and isinstance(value, (int, float)) and value < minimum:
        raise ConfigError(f"{where}: must be at least {minimum:g}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not accepted; use one of {', '.join(choices)}")
    return value


def check_fields(obj: Any, section: str) -> None:
    """Check every field of a config dataclass from its metadata; normalise units in place."""
    for f in dataclasses.fields(obj):
        if "types" not in f.metadata:
            continue
        value = check_value(section, f, getattr(obj, f.name))
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)


@dataclass
class CheckpointWriterConfig:
    """Writer knobs. ``file_size`` accepts bytes or a string with units (``"256MiB"``)."""

    write_barrier_timeout_secs: float = setting(
        600,
        doc="How long ranks wait for each other at the commit barrier.",
        types=(int, float),
        unit=UNIT_DURATION,
        minimum=0,
    )
    file_size: int | str = setting(
        256 << 20,
        doc="Target size of one data file; tensors are packed into files of about this size "
        "(a larger tensor gets its own file).",
        types=(int,),
        unit=UNIT_SIZE,
        minimum=1,
    )
    concurrency: int = setting(
        8,
        doc="Data files uploaded (and byte ranges read) at once per rank.",
        types=(int,),
        minimum=1,
    )
    replicated: list[str] = setting(
        doc="Glob patterns over key paths (`*` one component, `**` any) of plain leaves that "
        "are the same on every rank (DDP models, step counters): stored once, loadable at any "
        'world size. `["**"]`: every plain leaf. DTensors are always stored once.',
        types=(list,),
        default_factory=list,
    )

    def __post_init__(self) -> None:
        check_fields(self, "writer")
        try:
            self.replicated = list(check_patterns(self.replicated, "replicated"))
        except ValueError as e:
            raise ConfigError(f"[writer] {e}") from None

    @property
    def file_size_bytes(self) -> int:
        return int(self.file_size)


@dataclass
class CheckpointStagerConfig:
    """Staging knobs, plus a bound. Pinned memory and non-blocking copies need an accelerator
    (``None``: used when one is present; ``True`` on a machine without one warns); shared memory
    is used only when the writer is a process (it is how the process reads)."""

    use_pinned_memory: bool | None = setting(
        None,
        doc="Stage into pinned host memory (needs an accelerator). Absent: when an accelerator "
        "is present; `true` without one warns.",
        types=(bool, type(None)),
    )
    use_shared_memory: bool = setting(
        True,
        doc="Stage into shared memory when the writer is a process (required then; a thread "
        "writer never needs it).",
        types=(bool,),
    )
    use_async_staging: bool = setting(
        True, doc="Stage in a background thread; `save` returns at once.", types=(bool,)
    )
    use_non_blocking_copy: bool | None = setting(
        None,
        doc="Non-blocking device-to-host copies (needs an accelerator). Absent: when an "
        "accelerator is present; `true` without one warns.",
        types=(bool, type(None)),
    )
    max_staging_bytes: int | None = setting(
        None,
        doc="Upper bound on the host memory staging may hold (a size); a save that would need "
        "more fails at once with a `StagingError`. Absent: no bound.",
        types=(int, type(None)),
        unit=UNIT_SIZE,
        minimum=0,
    )

    def __post_init__(self) -> None:
        check_fields(self, "staging")


WRITER_KINDS = ("thread", "process")


@dataclass
class CheckpointProcessConfig:
    """Where the background writer runs and its timeouts."""

    subprocess_init_timeout_secs: float = setting(
        30,
        doc="How long the background writer may take to start.",
        types=(int, float),
        unit=UNIT_DURATION,
        minimum=0,
    )
    subprocess_shutdown_timeout_secs: float = setting(
        60,
        doc="How long closing waits for the background writer.",
        types=(int, float),
        unit=UNIT_DURATION,
        minimum=0,
    )
    writer: str = setting(
        "thread",
        doc="`thread` (a background thread of the training process) or `process` (a "
        "persistent writer process fed through shared memory; uploads never hold the "
        "trainer's GIL).",
        types=(str,),
        choices=WRITER_KINDS,
    )

    def __post_init__(self) -> None:
        check_fields(self, "process")
