"""The instruction stack: order, what is withheld from models the operator keeps personal
data from, and the shipped personalities."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from salon.errors import ConfigError
from salon.personalization.checks import Constraint
from salon.personalization.presets import load_presets
from salon.personalization.profile import AboutYou, Characteristics, Effective
from salon.personalization.stack import OPERATOR_NOTE, WITHHELD, Recalled, compose

WHEN = datetime(2026, 5, 1, tzinfo=UTC)


def _effective(**overrides: object) -> Effective:
    values: dict[str, object] = {
        "personality": "candid",
        "personality_text": "Personality — Candid: Be direct.",
        "characteristics": Characteristics(warm="more", emoji="less"),
        "length": "concise",
        "about": AboutYou(nickname="Sam", occupation="nurse"),
        "how_to_respond": "Use metric units.",
        "sources": {"personality": "conversation", "characteristics": "account"},
    }
    values.update(overrides)
    return Effective.model_validate(values)


def test_layers_come_in_the_documented_order_with_the_operator_first() -> None:
    context = compose(
        operator="Company policy: be accurate.",
        effective=_effective(),
        constraints=[Constraint("emoji_none", None, "characteristics")],
        memories=[Recalled("memory:1", "memory", "Is vegetarian", WHEN, 0.9)],
        history=[Recalled("message:5", "message", "I run on Sundays", WHEN, 0.7)],
    )
    assert [layer.id for layer in context.layers] == [
        "operator",
        "personality",
        "style",
        "about",
        "instructions",
        "memory",
        "history",
    ]
    assert context.system.startswith("Company policy: be accurate.\n" + OPERATOR_NOTE)
    personality = context.layers[1]
    assert personality.source == "conversation"
    # The system message is the layers' texts, in order, and nothing else.
    assert context.system == "\n\n".join(layer.text for layer in context.layers)
    assert "- no emoji" in context.layers[2].text
    assert "Call the user Sam." in context.system and "Is vegetarian" in context.system


def test_rules_from_the_message_are_checked_but_not_restated() -> None:
    context = compose(
        operator=None,
        effective=_effective(),
        constraints=[
            Constraint("emoji_none", None, "characteristics"),
            Constraint("language", "fr", "message"),
        ],
    )
    assert len(context.constraints) == 2
    assert "French" not in context.system and "- no emoji" in context.system


def test_personal_layers_are_withheld_from_a_model_that_must_not_get_them() -> None:
    context = compose(
        operator="Be accurate.",
        effective=_effective(),
        constraints=[],
        memories=[Recalled("memory:1", "memory", "Is vegetarian", WHEN, 0.9)],
        history=[Recalled("message:5", "message", "I run on Sundays", WHEN, 0.7)],
        share_personal=False,
    )
    withheld = {layer.id for layer in context.layers if layer.withheld}
    assert withheld == {"about", "instructions", "memory", "history"}
    assert all(layer.withheld == WITHHELD for layer in context.layers if layer.withheld)
    for private in ("Sam", "nurse", "metric", "vegetarian", "Sundays"):
        assert private not in context.system
    assert context.recalled == ()
    assert context.system.startswith("Be accurate.")


def test_the_shipped_personalities_are_all_there_and_well_formed() -> None:
    presets = load_presets()
    wanted = {"default", "professional", "friendly", "candid", "quirky", "efficient", "nerdy"}
    assert wanted | {"cynical"} <= set(presets)
    for preset in presets.values():
        assert preset.name and len(preset.description) > 40
    assert presets["efficient"].constraints["max_words"] == 120
    assert presets["professional"].constraints["emoji"] == "none"


def test_a_broken_personalities_file_is_a_clear_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[friendly]\nname = "Friendly"\ndescription = "Warm."\n')
    with pytest.raises(ConfigError, match="no \\[default\\]"):
        load_presets(path)
    path.write_text("[default\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_presets(path)
