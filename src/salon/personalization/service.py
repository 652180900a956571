"""Settings a user keeps (profile, personas), how they resolve for one conversation, and
the context one turn gets: the instruction stack, the recalled memories, the checks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from salon.errors import InvalidRequest, NotFound
from salon.personalization.checks import derive_constraints
from salon.personalization.memory import MemoryService
from salon.personalization.presets import Preset, load_presets
from salon.personalization.profile import (
    Characteristics,
    CharacteristicsPatch,
    Effective,
    Length,
    Persona,
    Profile,
    ProfilePatch,
    merge_characteristics,
)
from salon.personalization.stack import Recalled, TurnContext, compose
from salon.store.profiles import PersonaRecord, ProfileStore

PERSONA_PREFIX = "persona:"
MAX_PERSONAS = 50
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Conversationish:
    """What a turn needs to know about its conversation."""

    id: str
    settings: dict[str, Any] | None
    temporary: bool


@dataclass(frozen=True, slots=True)
class Personality:
    id: str
    name: str
    summary: str
    custom: bool


def validated(model: type[Model], data: Any) -> Model:
    """User input into a settings model; the first problem as a 400 with a message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        message = f"{where}: {first['msg']}" if where else str(first["msg"])
        raise InvalidRequest(message, param=where) from exc


class Personalizer:
    def __init__(
        self,
        store: ProfileStore,
        memory: MemoryService | None,
        clock: Callable[[], datetime],
        *,
        operator_prompt: str | None = None,
        presets: dict[str, Preset] | None = None,
    ) -> None:
        self._store = store
        self._memory = memory
        self._clock = clock
        self._operator = operator_prompt
        self._presets = presets or load_presets()

    @property
    def memory(self) -> MemoryService | None:
        return self._memory

    # -- the account's settings ----------------------------------------------------------

    async def profile(self, user_id: str) -> Profile:
        data = await self._store.profile(user_id)
        return Profile.model_validate(data) if data else Profile()

    async def save_profile(self, user_id: str, data: dict[str, Any]) -> Profile:
        merged = {**(await self.profile(user_id)).model_dump(), **data}
        profile = validated(Profile, merged)
        await self._check_personality(user_id, profile.personality)
        await self._store.save_profile(user_id, profile.model_dump(), self._clock())
        return profile

    async def personalities(self, user_id: str) -> list[Personality]:
        shipped = [Personality(p.id, p.name, p.summary, False) for p in self._presets.values()]
        own = [
            Personality(PERSONA_PREFIX + r.id, str(r.data["name"]), "Your persona", True)
            for r in await self._store.personas(user_id)
        ]
        return shipped + own

    # -- personas ------------------------------------------------------------------------

    async def personas(self, user_id: str) -> list[Persona]:
        return [_persona(r) for r in await self._store.personas(user_id)]

    async def save_persona(
        self, user_id: str, data: dict[str, Any], persona_id: str | None = None
    ) -> Persona:
        if persona_id is None:
            if len(await self._store.personas(user_id)) >= MAX_PERSONAS:
                raise InvalidRequest(f"at most {MAX_PERSONAS} personas")
            persona_id = str(uuid.uuid4())
        else:
            await self._store.persona(user_id, persona_id)  # owned, or 404
        persona = validated(Persona, {**data, "id": persona_id})
        body = persona.model_dump(exclude={"id"})
        return _persona(await self._store.save_persona(user_id, persona_id, body, self._clock()))

    async def delete_persona(self, user_id: str, persona_id: str) -> None:
        await self._store.delete_persona(user_id, persona_id)

    # -- one turn ------------------------------------------------------------------------

    async def effective(self, user_id: str, overrides: dict[str, Any] | None) -> Effective:
        return await self._effective(user_id, await self.profile(user_id), overrides)

    async def _effective(
        self, user_id: str, profile: Profile, overrides: dict[str, Any] | None
    ) -> Effective:
        """Account → persona/preset → conversation, each field from the highest layer
        that sets it."""
        patch = ProfilePatch.model_validate(overrides) if overrides else ProfilePatch()
        personality = patch.personality or profile.personality
        sources = {
            "personality": "conversation" if patch.personality else "account",
            "characteristics": "account",
        }
        if personality.startswith(PERSONA_PREFIX) and not patch.personality:
            sources["personality"] = "persona"
        name, text, traits, length = await self._personality(user_id, personality)
        # A preset's traits apply where the user left a characteristic at "default".
        characteristics = merge_characteristics(
            merge_characteristics(Characteristics(), traits), _chosen(profile.characteristics)
        )
        characteristics = merge_characteristics(characteristics, patch.characteristics)
        if patch.characteristics.model_dump(exclude_none=True):
            sources["characteristics"] = "conversation"
        chosen_length: Length = profile.length
        if chosen_length == "default" and length is not None:
            chosen_length = length
        if patch.length is not None:
            chosen_length, sources["length"] = patch.length, "conversation"
        how = profile.how_to_respond
        if patch.how_to_respond:
            how = f"{how}\n{patch.how_to_respond}".strip()
            sources["how_to_respond"] = "conversation"
        return Effective(
            personality=personality,
            personality_text=f"Personality — {name}: {text}",
            characteristics=characteristics,
            length=chosen_length,
            about=profile.about,
            how_to_respond=how,
            sources=sources,
        )

    async def prepare(
        self,
        user_id: str,
        conversation: Conversationish,
        message: str,
        *,
        share_personal: bool,
    ) -> TurnContext:
        """The instruction stack, recalled memories and checks for the next turn."""
        profile = await self.profile(user_id)
        effective = await self._effective(user_id, profile, conversation.settings)
        preset = self._presets.get(effective.personality)
        constraints = derive_constraints(
            effective, message, personality_constraints=preset.constraints if preset else {}
        )
        memories: list[Recalled] = []
        history: list[Recalled] = []
        if self._memory is not None and share_personal and not conversation.temporary:
            memories, history = await self._memory.recall(
                user_id,
                message,
                use_memories=profile.memory_enabled,
                use_history=profile.reference_history,
                exclude_conversation=conversation.id,
            )
        return compose(
            operator=self._operator,
            effective=effective,
            constraints=constraints,
            memories=memories,
            history=history,
            share_personal=share_personal,
        )

    # -- helpers -------------------------------------------------------------------------

    async def _personality(
        self, user_id: str, personality: str
    ) -> tuple[str, str, CharacteristicsPatch, Length | None]:
        if personality.startswith(PERSONA_PREFIX):
            try:
                record = await self._store.persona(user_id, personality[len(PERSONA_PREFIX) :])
            except NotFound:
                personality = "default"  # deleted since: fall back, never fail a turn
            else:
                persona = _persona(record)
                return persona.name, persona.description, persona.characteristics, persona.length
        preset = self._presets.get(personality) or self._presets["default"]
        return preset.name, preset.description, preset.characteristics, preset.length

    async def _check_personality(self, user_id: str, personality: str) -> None:
        if personality.startswith(PERSONA_PREFIX):
            await self._store.persona(user_id, personality[len(PERSONA_PREFIX) :])
        elif personality not in self._presets:
            raise InvalidRequest(
                f"unknown personality {personality!r}; choose one of "
                f"{', '.join(self._presets)} or one of your personas",
                param="personality",
            )

    async def check_overrides(self, user_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """A conversation's overrides, validated; returned as they will be stored."""
        patch = validated(ProfilePatch, data)
        if patch.personality:
            await self._check_personality(user_id, patch.personality)
        return patch.model_dump(exclude_none=True, exclude_defaults=True)


def _persona(record: PersonaRecord) -> Persona:
    return Persona.model_validate({**record.data, "id": record.id})


def _chosen(characteristics: Characteristics) -> CharacteristicsPatch:
    picked = {k: v for k, v in characteristics.model_dump().items() if v != "default"}
    return CharacteristicsPatch(**picked)
