"""Authentication of each request: a session cookie (with CSRF token) or an API key."""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import Response

from salon.accounts.service import Session
from salon.api.context import Services, services
from salon.errors import PermissionDenied, Unauthenticated
from salon.store.accounts import UserRecord

COOKIE = "salon_session"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def bearer(request: HTTPConnection) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def api_key_user(request: HTTPConnection) -> UserRecord:
    token = bearer(request)
    if token is None:
        raise Unauthenticated("missing API key: send 'Authorization: Bearer sk-salon-…'")
    return await services(request).accounts.user_for_key(token)


async def current_session(request: HTTPConnection) -> Session:
    token = request.cookies.get(COOKIE)
    if not token:
        raise Unauthenticated("not signed in")
    return await services(request).accounts.session(token)


async def current_user(request: HTTPConnection) -> UserRecord:
    """API keys work everywhere; a cookie session must prove the request is same-site."""
    if bearer(request) is not None:
        return await api_key_user(request)
    session = await current_session(request)
    if request.scope.get("method", "GET") not in SAFE_METHODS:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent, session.csrf_token):
            raise PermissionDenied("missing or wrong X-CSRF-Token header")
    return session.user


async def admin_user(request: HTTPConnection) -> UserRecord:
    user = await current_user(request)
    if user.role != "admin":
        raise PermissionDenied("admins only")
    return user


def set_session_cookie(response: Response, session: Session, svc: Services) -> None:
    response.set_cookie(
        COOKIE,
        session.token,
        max_age=svc.session_days * 86400,
        httponly=True,
        secure=svc.secure_cookies,
        samesite="lax",
        path="/",
    )
