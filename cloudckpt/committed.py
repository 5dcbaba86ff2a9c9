"""Opening a committed checkpoint; lives in :mod:`cloudckpt.protocol.committed`."""

from .protocol.committed import CommittedCheckpoint, open_checkpoint

__all__ = ["CommittedCheckpoint", "open_checkpoint"]
