"""Sign-up, sign-in, API keys and the admin's settings."""

from __future__ import annotations

from dataclasses import asdict

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from salon.accounts.service import Session
from salon.api import views
from salon.api.auth import COOKIE, admin_user, current_session, current_user, set_session_cookie
from salon.api.context import services
from salon.api.inputs import int_param, read_json


class Credentials(BaseModel):
    username: str
    password: str


class KeyInput(BaseModel):
    name: str


class LimitChanges(BaseModel):
    """Per-caller limits (0 = unlimited); an absent field keeps its value."""

    user_requests_per_minute: int | None = Field(default=None, ge=0)
    user_tokens_per_day: int | None = Field(default=None, ge=0)
    key_requests_per_minute: int | None = Field(default=None, ge=0)
    key_tokens_per_day: int | None = Field(default=None, ge=0)


class AdminSettings(BaseModel):
    signup_open: bool


def _signed_in(session: Session, request: Request, status: int = 200) -> Response:
    body = {"user": views.user(session.user), "csrf_token": session.csrf_token}
    response = JSONResponse(body, status)
    set_session_cookie(response, session, services(request))
    return response


async def state(request: Request) -> Response:
    accounts = services(request).accounts
    return JSONResponse(
        {"has_users": await accounts.has_users(), "signup_open": await accounts.signup_open()}
    )


async def signup(request: Request) -> Response:
    body = await read_json(request, Credentials)
    session = await services(request).accounts.signup(body.username, body.password)
    return _signed_in(session, request, 201)


async def login(request: Request) -> Response:
    body = await read_json(request, Credentials)
    session = await services(request).accounts.login(body.username, body.password)
    return _signed_in(session, request)


async def logout(request: Request) -> Response:
    token = request.cookies.get(COOKIE)
    if token:
        await services(request).accounts.logout(token)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


async def me(request: Request) -> Response:
    session = await current_session(request)
    return JSONResponse({"user": views.user(session.user), "csrf_token": session.csrf_token})


async def list_keys(request: Request) -> Response:
    user = await current_user(request)
    keys = await services(request).accounts.keys(user.id)
    return JSONResponse({"data": [views.api_key(k) for k in keys]})


async def create_key(request: Request) -> Response:
    user = await current_user(request)
    body = await read_json(request, KeyInput)
    new = await services(request).accounts.create_key(user.id, body.name)
    return JSONResponse({**views.api_key(new.record), "key": new.key}, 201)


async def delete_key(request: Request) -> Response:
    user = await current_user(request)
    await services(request).accounts.delete_key(user.id, request.path_params["key_id"])
    return Response(status_code=204)


async def admin_settings(request: Request) -> Response:
    await admin_user(request)
    accounts = services(request).accounts
    if request.method == "PATCH":
        body = await read_json(request, AdminSettings)
        await accounts.set_signup_open(body.signup_open)
    return JSONResponse({"signup_open": await accounts.signup_open()})


async def admin_limits(request: Request) -> Response:
    """The per-caller limits in force; PATCH changes them for every process at run time."""
    await admin_user(request)
    limiter = services(request).admission.limiter
    if request.method == "PATCH":
        body = await read_json(request, LimitChanges)
        return JSONResponse(asdict(await limiter.update(body.model_dump(exclude_none=True))))
    return JSONResponse(asdict(await limiter.current()))


async def admin_safety(request: Request) -> Response:
    """Per model: answers, and how many the safety layer blocked or recovered."""
    await admin_user(request)
    days = int_param(request, "days", 7, low=1, high=365) or 7
    data = await services(request).chat.safety_summary(days)
    return JSONResponse({"days": days, "enabled": services(request).safety_enabled, "data": data})


async def admin_users(request: Request) -> Response:
    await admin_user(request)
    users = await services(request).accounts.users()
    return JSONResponse({"data": [views.user(u) for u in users]})


def routes() -> list[BaseRoute]:
    return [
        Route("/api/auth/state", state),
        Route("/api/auth/signup", signup, methods=["POST"]),
        Route("/api/auth/login", login, methods=["POST"]),
        Route("/api/auth/logout", logout, methods=["POST"]),
        Route("/api/auth/me", me),
        Route("/api/keys", list_keys),
        Route("/api/keys", create_key, methods=["POST"]),
        Route("/api/keys/{key_id}", delete_key, methods=["DELETE"]),
        Route("/api/admin/settings", admin_settings, methods=["GET", "PATCH"]),
        Route("/api/admin/users", admin_users),
        Route("/api/admin/safety", admin_safety),
        Route("/api/admin/limits", admin_limits, methods=["GET", "PATCH"]),
    ]
