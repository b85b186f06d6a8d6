"""HTTP pieces every stage shares: health, metrics, `/v1` auth, errors, paging."""
from __future__ import annotations

import asyncio
import hmac
from typing import Any

import faust
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from workers.settings import Settings


def error(view: View, status: int, code: str, message: str) -> Response:
    """The contract's error body: `{"error": code, "message": text}`."""
    return view.json({"error": code, "message": message}, status=status)


def authorize(view: View, request: Request, settings: Settings, tenant: str | None) -> Response | None:
    """None when the bearer token is the tenant's; else the 401/403 response to return."""
    header = request.headers.get("Authorization", "")
    token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
    owner = next((t for t, known in settings.tokens_by_tenant.items() if hmac.compare_digest(known, token)), None)
    if not token or owner is None:
        return error(view, 401, "unauthorized", "Send Authorization: Bearer <token> with a token from USHER_API_TOKENS.")
    if tenant is None:
        return error(view, 400, "missing_tenant", "Name the tenant.")
    if owner != tenant:
        return error(view, 403, "forbidden", f"This token is not valid for tenant {tenant!r}.")
    return None


def paging(request: Request) -> tuple[int, int]:
    """`?page=1&size=100` with sane bounds."""
    try:
        page = max(1, int(request.query.get("page", 1)))
        size = min(1000, max(1, int(request.query.get("size", 100))))
    except ValueError:
        page, size = 1, 100
    return page, size


def page_of(items: list[Any], page: int, size: int) -> list[Any]:
    return items[(page - 1) * size : page * size]


def settled(app: faust.App, ready_events: list[asyncio.Event]) -> bool:
    """Tables recovered and reference feeds caught up: what this worker's state says is complete."""
    recovery = app.tables.recovery
    return all(event.is_set() for event in ready_events) and recovery.completed.is_set() and not recovery.in_recovery


def register_health(app: faust.App, ready_events: list[asyncio.Event]) -> None:
    """`/healthz` (process is up), `/readyz` (tables recovered and reference
    feeds caught up), `/metrics`."""

    @app.page("/healthz")
    async def healthz(view: View, request: Request) -> Response:
        return view.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(view: View, request: Request) -> Response:
        if settled(app, ready_events):
            return view.json({"status": "ok"})
        return view.json({"status": "recovering"}, status=503)

    @app.page("/metrics")
    async def metrics(view: View, request: Request) -> Response:
        return view.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])
