"""The knobs of the writer, the stager and the writer process, as dataclasses.

A leaf module: free of torch and of the layers that use these, so the config file loader
(``config.py``) and the command read them without importing torch, and the writer, stager and
writer process import them without importing the API layer. Their seed-era home modules
(``checkpoint_writer``, ``staging``, ``checkpoint_process``) re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .chunks import check_patterns
from .utils import parse_size


@dataclass
class CheckpointWriterConfig:
    """Writer knobs. ``file_size`` accepts bytes or a string with units (``"256MiB"``)."""

    write_barrier_timeout_secs: int = 600
    file_size: int | str = 256 << 20
    concurrency: int = 8
    replicated: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.replicated = list(check_patterns(self.replicated, "replicated"))
        self.file_size = parse_size(self.file_size)
        if self.file_size < 1:
            raise ValueError(f"file_size must be at least 1 byte, got {self.file_size}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")

    @property
    def file_size_bytes(self) -> int:
        return int(self.file_size)


@dataclass
class CheckpointStagerConfig:
    """The seed's flags, plus a bound. Pinned memory and non-blocking copies need an accelerator;
    shared memory is used only when the writer is a process (it is how the process reads)."""

    use_pinned_memory: bool = True
    use_shared_memory: bool = True
    use_async_staging: bool = True
    use_non_blocking_copy: bool = True
    max_staging_bytes: int | None = None


WRITER_KINDS = ("thread", "process")


@dataclass
class CheckpointProcessConfig:
    """Where the background writer runs and its timeouts (as in the seed)."""

    subprocess_init_timeout_secs: int = 30
    subprocess_shutdown_timeout_secs: int = 60
    writer: str = "thread"
