"""A Python client generated from ``/openapi.json`` with openapi-python-client, as an app's
developer would make one, works against a live gateway, and stays clean: one error model
for every error answer, one module per tag, a small number of models in all.

The client is generated at test time into the test's own directory, never kept in the
repository. openapi-python-client is in the test dependencies; its generated code needs
httpx and attrs, which it brings.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Final

import orjson
import pytest

from gateway.http.keys import STORAGE
from gateway.http.openapi import TAGS, openapi_document
from gateway.metrics import FlusherMetrics
from gateway.pipeline.flusher import Flusher
from signing import Keyring

from .harness import GatewayStarter, GatewayUnderTest
from .servers import missing

GENERATOR: Final = Path(sys.executable).parent / "openapi-python-client"
PACKAGE: Final = "scangate_client"
# What the generator is told, as an app's developer would tell it.
CONFIG: Final = {
    "package_name_override": PACKAGE,
    "project_name_override": "scangate-client",
    # No formatter is run over the generated code: what is tested is what was generated.
    "post_hooks": [],
    # Posters and personal codes are images and PDFs: bytes to the client.
    "content_type_overrides": {
        media: "application/octet-stream"
        for media in ("image/png", "image/svg+xml", "application/pdf")
    },
}
# 265 models before the document shared its error answers (182 of them one error class per
# operation and status); what is left is one per request body, success answer and enum.
MAX_MODELS: Final = 75
GENERATE_TIMEOUT_S: Final = 120

ClientLoader = Callable[[bytes], ModuleType]

# Against one server kind: the client does not depend on it.
ONE_SERVER: Final = pytest.mark.parametrize("redis_server", ["valkey"], indirect=True)


def generate_client(document: bytes, into: Path) -> Path:
    """The client package generated from ``document``; any warning of the generator (an
    operation or answer it could not understand) fails."""
    if not GENERATOR.exists():
        missing(f"{GENERATOR.name} is not installed: pip install --group test")
    spec, config = into / "openapi.json", into / "openapi-python-client.json"
    spec.write_bytes(document)
    config.write_text(json.dumps(CONFIG))
    package = into / PACKAGE
    done = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(spec),
            "--config",
            str(config),
            "--meta",
            "none",
            "--output-path",
            str(package),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=GENERATE_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return package


@pytest.fixture
def client_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ClientLoader]:
    """Generate a client from a document and import it; forgotten again afterwards."""
    into = tmp_path / "generated"
    into.mkdir()

    def load(document: bytes) -> ModuleType:
        generate_client(document, into)
        monkeypatch.syspath_prepend(str(into))
        importlib.invalidate_caches()
        return importlib.import_module(PACKAGE)

    yield load
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_the_generated_client_has_one_error_model_and_a_module_per_tag(tmp_path: Path) -> None:
    package = generate_client(orjson.dumps(openapi_document()), tmp_path)
    models = sorted(p.stem for p in (package / "models").glob("*.py") if p.stem != "__init__")
    print(f"{len(models)} models")
    errors = [m for m in models if "error" in m]
    assert errors == ["error"], errors
    assert len(models) <= MAX_MODELS, models
    modules = {p.name for p in (package / "api").iterdir() if p.is_dir()}
    assert modules == {tag["name"] for tag in TAGS}
    # A readable function per operation, named by its operationId.
    assert (package / "api" / "scans" / "post_scans.py").is_file()
    assert (package / "api" / "trace" / "get_trace.py").is_file()


async def _flush(gateway: GatewayUnderTest) -> None:
    """Move everything buffered into storage, as the flusher process does."""
    flusher = Flusher(gateway.redis, gateway.app[STORAGE], gateway.settings, FlusherMetrics())
    while await flusher.step():
        pass


@ONE_SERVER
async def test_a_generated_client_posts_scans_registers_a_venue_and_reads_a_trace(
    gateway_under_test: GatewayStarter,
    redis_url: str,
    keyring: Keyring,
    client_package: ClientLoader,
) -> None:
    app_token = keyring.add_app("vhd", name="Vietnam Health Declaration").token
    gateway = await gateway_under_test(redis_url, shards=4, flush_max_age_s=0.01)
    admin_token = await gateway.app[STORAGE].add_admin("client")
    answer = await gateway.client.get("/openapi.json")
    assert answer.status == 200
    document = await answer.read()
    generated = await asyncio.to_thread(client_package, document)
    models = importlib.import_module(f"{PACKAGE}.models")
    post_venue = importlib.import_module(f"{PACKAGE}.api.venues.post_venue")
    post_scans = importlib.import_module(f"{PACKAGE}.api.scans.post_scans")
    get_trace = importlib.import_module(f"{PACKAGE}.api.trace.get_trace")

    as_app = generated.AuthenticatedClient(base_url=gateway.url, token=app_token)
    as_admin = generated.AuthenticatedClient(base_url=gateway.url, token=admin_token)
    async with as_app, as_admin:
        # Register a venue: its id and code come back as a model.
        form = models.VenueForm(
            name="Chợ Bến Thành",
            phone="098 382 9927",
            address="Lê Lợi, Quận 1",
            province="Hồ Chí Minh",
            kind=models.VenueKind.MARKET,
        )
        venue = await post_venue.asyncio(client=as_app, body=form)
        assert isinstance(venue, models.PostVenueResponse201), venue
        # A refusal is the one Error model, with the documented code.
        form.phone = "12"
        refused = await post_venue.asyncio_detailed(client=as_app, body=form)
        assert refused.status_code == 400
        assert isinstance(refused.parsed, models.Error)
        assert refused.parsed.error == "invalid_phone"

        # P1 and P2 at the venue for the same hour.
        now_ms = int(time.time() * 1000)
        events = [
            models.ScanEvent(
                event_id=f"EVT-client-{person}-{kind}",
                kind=models.ScanKind(kind),
                venue_code=venue.code,
                person_code=keyring.issue("vhd", "person", person, ttl_s=86400),
                scanned_at=now_ms - minutes_ago * 60_000,
            )
            for person in ("P1", "P2")
            for kind, minutes_ago in (("checkin", 90), ("checkout", 30))
        ]
        result = await post_scans.asyncio(client=as_app, body=models.PostScansBody(events=events))
        assert isinstance(result, models.ScanResult), result
        assert (result.accepted, result.duplicates, result.rejected) == (4, 0, 0)
        await _flush(gateway)

        # The trace of P1, read as an official: P2 is a contact at the venue.
        trace = await get_trace.asyncio(client=as_admin, person_id="P1", min_overlap="1m")
        assert isinstance(trace, models.GetTraceResponse200), trace
        rows = [(row.person_id, row.venue_id, row.depth) for row in trace.rows]
        assert rows == [("P2", venue.venue_id, 1)]
        unknown = await get_trace.asyncio_detailed(client=as_admin, person_id="NOBODY")
        assert unknown.status_code == 404
        assert isinstance(unknown.parsed, models.Error)
        assert unknown.parsed.error == "unknown_person"
