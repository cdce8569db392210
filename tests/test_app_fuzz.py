"""Label Studio's real requests with one value replaced by arbitrary JSON: never a 500."""

from __future__ import annotations

import copy

import pytest
from conftest import payload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.settings import load_settings

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)

CASES = [("/webhook", "webhook_TASKS_CREATED"), ("/webhook", "webhook_ANNOTATION_CREATED_ranker"),
         ("/webhook", "webhook_ANNOTATION_UPDATED_ranker"), ("/webhook", "webhook_ANNOTATIONS_DELETED"),
         ("/webhook", "webhook_START_TRAINING"), ("/setup", "setup"), ("/predict", "predict_on_task_open_ranker")]


def paths(value, prefix=()):
    """Every path to a value inside a JSON document (the project's long config excluded: it is one string)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths(child, prefix + (i,))


def replaced(document, path, new):
    if not path:
        return new
    document = copy.deepcopy(document)
    target = document
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return document


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_policy, tiny_encoder):
    env = {"MODEL_DIR": str(tmp_path_factory.mktemp("fuzz")), "POLICY_MODEL": str(tiny_policy),
           "REWARD_MODEL": str(tiny_encoder)}
    return create_app(load_settings(env)).test_client()


@pytest.mark.parametrize("route,name", CASES)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_value_replaced_gets_a_json_answer_below_500(client, route, name, data):
    original = payload(name)
    path = data.draw(st.sampled_from(list(paths(original))))
    body = replaced(original, path, data.draw(json_values))
    response = client.post(route, json=body)
    assert response.status_code < 500, (path, response.get_json())
    assert isinstance(response.get_json(), dict)
