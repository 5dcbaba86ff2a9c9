"""cloudckpt's Google Cloud Storage backend: ``gs://`` and ``gcs://`` URIs, on gcsfs."""

from .backend import GCSBackend

__all__ = ["GCSBackend"]
