"""What is stored, for officials and operators (admin token): a person's stored scan
events and visits (``GET /v1/visits/{person_id}``, ``scangate visits``), audit-logged; and
the pipeline's status (``GET /v1/status``, ``scangate status``)."""

from __future__ import annotations

import time
from typing import Any, Final

from aiohttp import web

from gateway.http.context import authenticate_admin, json_response
from gateway.http.errors import InvalidRequest, UnknownPerson
from gateway.http.keys import REDIS, SETTINGS, STORAGE
from gateway.pipeline.status import buffer_status, storage_status
from signing.codes import ID_PATTERN
from storage import ScanEvent, Storage, Visit
from storage.times import format_time_ms
from storage.tracing import RECORDED_ENDS

YEAR_MS: Final = 366 * 86_400_000


async def person_record(storage: Storage, person_id: str, actor: str) -> dict[str, Any]:
    """A person's stored events and visits, as JSON; the read is audit-logged."""
    events = await storage.person_events(person_id)
    # Every visit: none ends a year from now (PostgreSQL's timestamps have an end, too).
    visits = await storage.person_visits(person_id, 0, int(time.time() * 1000) + YEAR_MS)
    await storage.audit(
        actor, "visits_read", person_id, f"events={len(events)} visits={len(visits)}"
    )
    return {
        "person_id": person_id,
        "events": [_event_json(e) for e in events],
        "visits": [_visit_json(v) for v in visits],
    }


def _event_json(event: ScanEvent) -> dict[str, Any]:
    return {
        "app_id": event.app_id,
        "event_id": event.event_id,
        "kind": event.kind,
        "venue_id": event.venue_id,
        "scanned_at": format_time_ms(event.scanned_at_ms),
        "received_at": format_time_ms(event.received_at_ms),
        "device_id": event.device_id,
    }


def _visit_json(visit: Visit) -> dict[str, Any]:
    return {
        "venue_id": visit.venue_id,
        "checkin_at": format_time_ms(visit.checkin_at_ms),
        "checkout_at": format_time_ms(visit.checkout_at_ms),
        "closed_by": visit.closed_by,
        "checkout_recorded": visit.closed_by in RECORDED_ENDS,
    }


async def pipeline_status(client: Any, shards: int, storage: Storage) -> dict[str, Any]:
    """The status document: ``{"buffer": ..., "storage": ..., "outbox": ...}``."""
    now_ms = int(time.time() * 1000)
    if client is None:
        buffer: dict[str, Any] = {
            "error": "no Redis to ask: set SCANGATE_REDIS_URL, or start scangate serve"
        }
    else:
        buffer = await buffer_status(client, shards, now_ms)
    return {"buffer": buffer, **await storage_status(storage)}


async def get_visits(request: web.Request) -> web.Response:
    storage = request.app[STORAGE]
    admin = await authenticate_admin(request, storage)
    person_id = request.match_info["person_id"]
    if not ID_PATTERN.fullmatch(person_id):
        raise InvalidRequest("person_id: 1 to 16 characters of A-Z0-9")
    if not await storage.person_known(person_id):
        raise UnknownPerson(f"nothing is stored of {person_id}")
    doc = await person_record(storage, person_id, f"admin:{admin}")
    return json_response(doc, no_store=True)


async def get_status(request: web.Request) -> web.Response:
    app = request.app
    storage = app[STORAGE]
    await authenticate_admin(request, storage)
    doc = await pipeline_status(app[REDIS], app[SETTINGS].shards, storage)
    return json_response(doc, no_store=True)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/visits/{person_id}", get_visits, name="visits")
    app.router.add_get("/v1/status", get_status, name="status")
