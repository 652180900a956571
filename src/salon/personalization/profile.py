"""What a user can set about how salon talks to them, and how the layers combine.

Layers, lowest to highest precedence (the one documented order, shown in the UI as a stack):

1. account defaults            — `Profile`, one per user
2. persona                     — a user-defined personality (`Persona`), picked by the account
                                 or by the conversation
3. conversation override       — `ProfilePatch` stored on the conversation
4. the message itself          — what the user asks in the turn ("answer in French") wins
                                 over every stored setting; it is read by the checks, not merged
   operator system instructions sit above all of these and no user layer can override them.

Each layer is a patch: a field left as None inherits from the layer below.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Level = Literal["less", "default", "more"]
Length = Literal["concise", "default", "detailed"]

MAX_NICKNAME = 40
MAX_OCCUPATION = 100
MAX_FREE_TEXT = 1500
MAX_PERSONA_NAME = 40
MAX_PERSONA_TEXT = 1500


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Characteristics(_Strict):
    warm: Level = "default"
    enthusiastic: Level = "default"
    headers_lists: Level = "default"
    emoji: Level = "default"


class CharacteristicsPatch(_Strict):
    warm: Level | None = None
    enthusiastic: Level | None = None
    headers_lists: Level | None = None
    emoji: Level | None = None


class AboutYou(_Strict):
    nickname: str = Field("", max_length=MAX_NICKNAME)
    occupation: str = Field("", max_length=MAX_OCCUPATION)
    more: str = Field("", max_length=MAX_FREE_TEXT)


class Profile(_Strict):
    """Account defaults: every field has a value."""

    personality: str = "default"  # a preset id, or "persona:<id>"
    characteristics: Characteristics = Characteristics()
    length: Length = "default"
    about: AboutYou = AboutYou()
    how_to_respond: str = Field("", max_length=MAX_FREE_TEXT)
    memory_enabled: bool = True  # saved memories: used in context and extracted
    reference_history: bool = True  # past conversations retrieved into context


class ProfilePatch(_Strict):
    """A conversation's overrides: None inherits from the account."""

    personality: str | None = None
    characteristics: CharacteristicsPatch = CharacteristicsPatch()
    length: Length | None = None
    how_to_respond: str | None = Field(None, max_length=MAX_FREE_TEXT)


class Persona(_Strict):
    """A personality a user defines: a name, a behavioural description, optional
    characteristics that go with it."""

    id: str = ""
    name: str = Field(min_length=1, max_length=MAX_PERSONA_NAME)
    description: str = Field(min_length=1, max_length=MAX_PERSONA_TEXT)
    characteristics: CharacteristicsPatch = CharacteristicsPatch()
    length: Length | None = None


class Effective(_Strict):
    """The settings in force for one turn, with where each came from (for the stack)."""

    personality: str
    personality_text: str
    characteristics: Characteristics
    length: Length
    about: AboutYou
    how_to_respond: str
    sources: dict[str, str]  # field name -> "account" | "persona" | "conversation"


def merge_characteristics(base: Characteristics, patch: CharacteristicsPatch) -> Characteristics:
    values = base.model_dump()
    values.update({k: v for k, v in patch.model_dump().items() if v is not None})
    return Characteristics(**values)
