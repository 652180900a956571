"""What the routes reach: the services the composition root built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from starlette.requests import HTTPConnection

from salon.accounts.service import AccountService
from salon.chat.admission import Admission
from salon.chat.gateway import Gateway
from salon.chat.service import ChatService
from salon.personalization.service import Personalizer


@dataclass(frozen=True, slots=True)
class Services:
    accounts: AccountService
    chat: ChatService
    gateway: Gateway
    personalizer: Personalizer
    max_body_bytes: int
    secure_cookies: bool
    session_days: int
    admission: Admission
    safety_enabled: bool = False


def services(request: HTTPConnection) -> Services:
    return cast(Services, request.app.state.services)
