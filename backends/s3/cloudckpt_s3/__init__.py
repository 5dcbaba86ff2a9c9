"""cloudckpt's S3 backend (``s3://``, ``s3a://``), found through the ``cloudckpt.backends``
entry point."""

from .backend import S3Backend

__all__ = ["S3Backend"]
