"""Who is calling. Passwords are hashed with argon2id; session tokens and API keys are
random and stored only as sha256 digests (they are high-entropy, so a fast hash is enough)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from salon.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated
from salon.store.accounts import AccountStore, ApiKeyRecord, UserRecord

USERNAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
KEY_PREFIX = "sk-salon-"
# A key lookup is cached this long, so that a hot API path does not query the store on
# every request; deleting a key takes effect here at once and elsewhere within this time.
KEY_CACHE_S = 30.0


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    user: UserRecord
    csrf_token: str


@dataclass(frozen=True, slots=True)
class NewKey:
    record: ApiKeyRecord
    key: str


class AccountService:
    def __init__(self, store: AccountStore, *, session_days: int, signup_default: bool) -> None:
        self._store = store
        self._session_days = session_days
        self._signup_default = signup_default
        self._hasher = PasswordHasher()
        self._keys: dict[str, tuple[float, str, UserRecord]] = {}
        # Verifying against a dummy hash when the user does not exist keeps the timing of
        # "no such user" and "wrong password" alike.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))

    # -- sign-up and sign-in -------------------------------------------------------------

    async def signup_open(self) -> bool:
        return bool(await self._store.get_setting("signup_open", self._signup_default))

    async def set_signup_open(self, value: bool) -> None:
        await self._store.set_setting("signup_open", value)

    async def has_users(self) -> bool:
        return await self._store.count_users() > 0

    async def signup(self, username: str, password: str) -> Session:
        """The first account of an instance becomes admin, even with sign-up closed."""
        if await self.has_users() and not await self.signup_open():
            raise PermissionDenied("sign-up is closed on this instance; ask an admin")
        user = await self.create_user(username, password, admin=False, first_is_admin=True)
        return await self._new_session(user)

    async def create_user(
        self, username: str, password: str, *, admin: bool, first_is_admin: bool = False
    ) -> UserRecord:
        _check_credentials(username, password)
        password_hash = await asyncio.to_thread(self._hasher.hash, password)
        record = UserRecord(
            str(uuid.uuid4()),
            username,
            password_hash,
            "admin" if admin else "user",
            datetime.now(UTC),
        )
        return await self._store.create_user(record, first_is_admin=first_is_admin)

    async def login(self, username: str, password: str) -> Session:
        user = await self._store.user_by_name(username)
        stored = user.password_hash if user else self._dummy_hash
        if not await asyncio.to_thread(self._verify, stored, password) or user is None:
            raise Unauthenticated("wrong username or password")
        return await self._new_session(user)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    async def _new_session(self, user: UserRecord) -> Session:
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(24)
        now = datetime.now(UTC)
        await self._store.create_session(
            _digest(token), user.id, csrf, now, now + timedelta(days=self._session_days)
        )
        return Session(token, user, csrf)

    async def session(self, token: str) -> Session:
        record = await self._store.session(_digest(token), datetime.now(UTC))
        if record is None:
            raise Unauthenticated("not signed in")
        return Session(token, record.user, record.csrf_token)

    async def logout(self, token: str) -> None:
        await self._store.delete_session(_digest(token))

    async def users(self) -> list[UserRecord]:
        return await self._store.list_users()

    # -- API keys ------------------------------------------------------------------------

    async def create_key(self, user_id: str, name: str) -> NewKey:
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequest("a key needs a name of 1 to 100 characters", param="name")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            str(uuid.uuid4()), user_id, name, key[: len(KEY_PREFIX) + 4], datetime.now(UTC), None
        )
        await self._store.create_key(record, _digest(key))
        return NewKey(record, key)

    async def create_key_for(self, username: str, name: str) -> NewKey:
        user = await self._store.user_by_name(username)
        if user is None:
            raise NotFound(f"no user named {username!r}")
        return await self.create_key(user.id, name)

    async def keys(self, user_id: str) -> list[ApiKeyRecord]:
        return await self._store.list_keys(user_id)

    async def delete_key(self, user_id: str, key_id: str) -> None:
        if not await self._store.delete_key(user_id, key_id):
            raise NotFound("API key not found")
        self._keys = {h: v for h, v in self._keys.items() if v[1] != key_id}

    async def user_for_key(self, key: str) -> UserRecord:
        digest = _digest(key)
        cached = self._keys.get(digest)
        now = time.monotonic()
        if cached and now - cached[0] < KEY_CACHE_S:
            return cached[2]
        found = await self._store.user_by_key(digest) if key.startswith(KEY_PREFIX) else None
        if found is None:
            raise Unauthenticated("invalid API key")
        key_id, user = found
        await self._store.touch_key(key_id, datetime.now(UTC))
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[digest] = (now, key_id, user)
        return user


def _check_credentials(username: str, password: str) -> None:
    if not USERNAME.match(username):
        raise InvalidRequest(
            "a username is 1 to 64 letters, digits, dots, dashes or underscores",
            param="username",
        )
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidRequest(
            f"a password needs at least {MIN_PASSWORD} characters", param="password"
        )
