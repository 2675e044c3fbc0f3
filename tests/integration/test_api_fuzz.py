"""Property-based fuzzing of every API operation from its own OpenAPI document (schemathesis, in process).

Schemathesis reads the app's ``/openapi.json`` and, for each operation, generates requests that follow the
schema and requests that break it (wrong types, missing or extra fields, odd strings and numbers, bodies that are
not JSON). Whatever arrives, the service must answer with a client error or a success, never a 5xx, and every
answer it documents must match its documented shape. The app runs in process over ASGI on the session's tiny
model.

Every answer's status code and content type must be documented too (a body that is not UTF-8 gets a documented
400 with a hint). Requests carry a key with every scope, so each operation is exercised past the key check.

``schemathesis.pytest.from_fixture`` does not work with pytest 9 (it reads ``node._nodeid``), so the schema is
loaded at import from an app without a model (the OpenAPI document needs none) and each case is sent to the real
app from the fixture with ``case.call(app=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from finrec.config import FinrecSettings
from finrec.serving.app import create_app
from finrec.serving.service import Service
from finrec.testing import TEST_API_KEY

pytestmark = pytest.mark.integration

KEY = TEST_API_KEY  # serve.api_key: every scope
EXAMPLES_PER_OPERATION = 60


def _settings(**values: Any) -> FinrecSettings:
    """Settings from ``values`` and the defaults only, whatever FINREC_* variables the caller has set."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [k for k in os.environ if k.startswith("FINREC_")]:
            mp.delenv(name)
        return FinrecSettings(**values)


# An app that is never called: it only provides the OpenAPI document and tells schemathesis to speak ASGI.
_SCHEMA_APP = create_app(_settings())
schema = schemathesis.openapi.from_dict(_SCHEMA_APP.openapi())
schema.app = _SCHEMA_APP


@pytest.fixture(scope="module")
def app(tiny_model: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    workspace = tmp_path_factory.mktemp("fuzz")
    service = Service.from_settings(_settings(workspace=workspace, serve={"api_key": KEY, "clock": "data"}),
                                    tiny_model, tiny_world)  # fmt: skip
    yield create_app(service.settings, service=service)  # schemathesis runs its lifespan on the first call
    service.close()


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
def test_no_generated_request_gets_a_server_error_or_an_undocumented_body(app: Any, case: Any) -> None:
    case.call_and_validate(app=app, headers={"X-API-Key": KEY},
                           checks=[checks.not_a_server_error, checks.response_schema_conformance,
                                   checks.status_code_conformance, checks.content_type_conformance])  # fmt: skip
