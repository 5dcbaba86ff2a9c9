"""botocore's S3 SigV4 signer with an unsigned payload (imports botocore: loaded on first use)."""

from __future__ import annotations

from typing import Any

from botocore.auth import UNSIGNED_PAYLOAD, S3SigV4Auth


class UnsignedPayload(S3SigV4Auth):
    """Signs a request with ``UNSIGNED-PAYLOAD`` as its payload hash, on any endpoint (botocore
    hashes the whole body whenever the endpoint is not ``https``)."""

    def payload(self, request: Any) -> str:
        return str(UNSIGNED_PAYLOAD)
