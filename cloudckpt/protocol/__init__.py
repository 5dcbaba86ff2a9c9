"""The on-storage protocol: one owner of the format and of the commit.

- :mod:`.records`: object names (attempt-scoped, format version 2), name validation, the
  typed index and manifest (with its own CRC32C), a rank's outcome and the commit result;
- :mod:`.committed`: opening a committed checkpoint and reading a rank's index, checked;
- :mod:`.commit`: ``commit`` (create-only or atomic replace, read back after an ambiguous
  answer), ``discard`` of an attempt's objects, ``remove_checkpoint``, orphans and their gc;
- :mod:`.verify` and :mod:`.copy`: ``verify(uri)`` and ``copy(src, dst)``.

The writer, the manager and the ``cloudckpt`` command all go through these functions.
"""

from .commit import (
    CommitReport,
    GcReport,
    Orphan,
    OrphanGroup,
    collect_orphans,
    commit,
    discard,
    list_orphans,
    read_manifest,
    remove_checkpoint,
    store_call,
)
from .committed import CommittedCheckpoint, open_checkpoint
from .copy import CopyReport, copy
from .records import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CommitResult,
    FileRecord,
    Manifest,
    RankEntry,
    RankIndex,
    RankOutcome,
    TensorRecord,
    check_name,
    data_file_name,
    index_name,
    new_attempt_id,
)
from .verify import VerifyReport, verify, verify_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "CommitReport",
    "CommitResult",
    "CommittedCheckpoint",
    "CopyReport",
    "FileRecord",
    "GcReport",
    "Manifest",
    "Orphan",
    "OrphanGroup",
    "RankEntry",
    "RankIndex",
    "RankOutcome",
    "TensorRecord",
    "VerifyReport",
    "check_name",
    "collect_orphans",
    "commit",
    "copy",
    "data_file_name",
    "discard",
    "index_name",
    "list_orphans",
    "new_attempt_id",
    "open_checkpoint",
    "read_manifest",
    "remove_checkpoint",
    "store_call",
    "verify",
    "verify_checkpoint",
]
