"""Write a TOML config file that selects a storage target (used by the config, manager and CLI tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stores import StoreTarget


def toml_value(value: Any) -> str:
    """A TOML literal for a str, bool, number or (nested, inline) table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML literal for {value!r}")


def write_store_config(path: Path, store: StoreTarget, extra: str = "") -> Path:
    """``[storage]`` with the store's root, backend and options; ``extra`` TOML appended."""
    lines = ["[storage]", f"root = {toml_value(store.root)}"]
    if store.backend:
        lines.append(f"backend = {toml_value(store.backend)}")
    if store.storage_options:
        lines.append("[storage.options]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in store.storage_options.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path
