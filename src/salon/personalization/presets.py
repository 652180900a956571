"""Personality presets, kept as data (data/personalities.toml) and loaded once."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from salon.errors import ConfigError
from salon.personalization.profile import CharacteristicsPatch, Length

SHIPPED = Path(__file__).parent / "data" / "personalities.toml"


@dataclass(frozen=True, slots=True)
class Preset:
    id: str
    name: str
    summary: str
    description: str
    characteristics: CharacteristicsPatch = field(default_factory=CharacteristicsPatch)
    length: Length | None = None
    # What code checks on every reply while the preset is active, e.g. {"max_words": 120}.
    constraints: dict[str, str | int] = field(default_factory=dict)


def _preset(preset_id: str, raw: dict[str, Any]) -> Preset:
    try:
        return Preset(
            id=preset_id,
            name=str(raw["name"]),
            summary=str(raw.get("summary", "")),
            description=" ".join(str(raw["description"]).split()),
            characteristics=CharacteristicsPatch(**raw.get("characteristics", {})),
            length=raw.get("length"),
            constraints=dict(raw.get("constraints", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"personality {preset_id!r} is malformed: {exc}") from exc


@cache
def load_presets(path: Path = SHIPPED) -> dict[str, Preset]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read personalities from {path}: {exc}") from exc
    presets = {key: _preset(key, value) for key, value in raw.items()}
    if "default" not in presets:
        raise ConfigError(f"{path} has no [default] personality")
    return presets
