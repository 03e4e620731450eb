"""Registry of known main/assistant T5 pairs; exported folders land beside this file."""

from __future__ import annotations

import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
REGISTRY: dict[str, dict] = json.loads((MODELS_DIR / "registry.json").read_text())["models"]


def lookup(name: str) -> dict | None:
    """The registry entry for a hub name (with or without its organisation), or None."""
    for key, entry in REGISTRY.items():
        if name in (key, entry["hub"], entry["hub"].split("/")[-1]):
            return {"name": key, **entry}
    return None


def known_names() -> list[str]:
    """Every registered model name, for error messages."""
    return sorted(REGISTRY)
