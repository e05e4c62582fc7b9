"""What operators and tools read: ``/healthz`` (alive), ``/readyz`` (Redis and storage
answer), ``/metrics`` (Prometheus) and ``/openapi.json`` (this document)."""

from __future__ import annotations

from typing import Final

from gateway.http.openapi.schemas import PUBLIC, Schema, _error, _json, _object

METRICS_MEDIA_TYPE: Final = "text/plain"
# Not in the document when SCANGATE_METRICS_PORT serves it on a listener of its own.
METRICS_PATH: Final = "/metrics"

PATHS: Final[dict[str, Schema]] = {
    "/healthz": {
        "get": {
            "operationId": "getHealthz",
            "tags": ["operations"],
            "summary": "Alive",
            "security": PUBLIC,
            "responses": {"200": _json(_object({"status": {"const": "ok"}}), "Alive")},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "getReadyz",
            "tags": ["operations"],
            "summary": "Ready: Redis and storage answer",
            "security": PUBLIC,
            "responses": {
                "200": _json(
                    _object(
                        {
                            "status": {"const": "ready"},
                            "redis": {"const": "ok"},
                            "storage": {"const": "ok"},
                        }
                    ),
                    "Ready",
                ),
                **_error(503, "Redis or storage does not answer", "unavailable"),
            },
        }
    },
    METRICS_PATH: {
        "get": {
            "operationId": "getMetrics",
            "tags": ["operations"],
            "summary": "Prometheus metrics of all workers",
            "security": PUBLIC,
            "responses": {
                "200": {
                    "description": "The Prometheus text exposition format",
                    "content": {METRICS_MEDIA_TYPE: {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenapi",
            "tags": ["operations"],
            "summary": "This document",
            "security": PUBLIC,
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
        }
    },
}
