"""Fuzzing from the OpenAPI document: schemathesis generates requests for every operation of
/openapi.json (bodies and queries that follow the schemas, and ones that break them) against the
app with basic auth off, on with the credentials, and on with wrong ones. None may get a 5xx."""

from __future__ import annotations

import base64

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from backend.app import create_app
from backend.settings import load_settings

EXAMPLES = 60  # per operation and generation mode: about 1,100 requests per app, 3,300 in all
USER, PASSWORD = "ls", "pässword"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_app(tmp_path_factory, tiny_policy, tiny_encoder, **auth):
    env = {"MODEL_DIR": str(tmp_path_factory.mktemp("openapi")), "POLICY_MODEL": str(tiny_policy),
           "REWARD_MODEL": str(tiny_encoder), **auth}
    return create_app(load_settings(env))


@pytest.fixture(scope="module")
def open_app(tmp_path_factory, tiny_policy, tiny_encoder):
    return make_app(tmp_path_factory, tiny_policy, tiny_encoder)


@pytest.fixture(scope="module")
def locked_app(tmp_path_factory, tiny_policy, tiny_encoder):
    return make_app(tmp_path_factory, tiny_policy, tiny_encoder, BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)


def fuzz(app, headers: dict, check) -> int:
    """Every operation of the app's own document, in both generation modes; returns the requests sent."""
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app, headers=headers)
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                nonlocal sent
                response = case.call(headers=headers)
                sent += 1
                assert response.status_code < 500, (
                    f"{case.method} {case.formatted_path} {case.body!r:.200}: {response.status_code} {response.text[:300]}")
                check(case, response)

            try:
                run()
            except Unsatisfiable:  # an operation without parameters or body has nothing to break
                if mode is not GenerationMode.NEGATIVE:
                    raise
    return sent


def test_no_request_from_the_openapi_document_gets_a_5xx_with_auth_off(open_app):
    assert fuzz(open_app, {}, lambda case, response: None) > 500


def test_no_request_with_the_credentials_gets_a_5xx(locked_app):
    assert fuzz(locked_app, {"Authorization": basic(USER, PASSWORD)}, lambda case, response: None) > 500


def test_with_wrong_credentials_every_route_but_health_is_refused(locked_app):
    def refused(case, response):
        if case.path != "/health":
            assert response.status_code in (401, 405), (case.method, case.path, response.status_code)

    # the document itself is behind the lock: read it with the credentials, send every case with wrong ones
    schema_headers = {"Authorization": basic(USER, PASSWORD)}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", locked_app, headers=schema_headers)
    wrong = {"Authorization": basic(USER, "wrong")}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            refused(case, case.call(headers=wrong))

        run()


def test_the_openapi_document_names_every_route_the_app_serves(open_app):
    document = open_app.test_client().get("/openapi.json").get_json()
    served = {rule.rule for rule in open_app.url_map.iter_rules() if rule.endpoint != "static"}
    assert served == set(document["paths"])
    assert document["openapi"].startswith("3.1") and "WebhookEvent" in document["components"]["schemas"]
