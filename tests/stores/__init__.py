"""Storage targets for the conformance suite."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StoreTarget:
    """A fresh URI prefix on one store, with the options and backend name to reach it."""

    name: str
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for cloudckpt.save/load that reach this store."""
        return {"storage_options": self.storage_options} if self.storage_options else {}


def fresh_name() -> str:
    return uuid.uuid4().hex[:10]
