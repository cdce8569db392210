"""The HTTP contract Label Studio speaks, replayed from real captured requests, and bad input."""

from __future__ import annotations

import copy

import pytest
from conftest import payload

from backend.app import create_app
from backend.settings import load_settings


@pytest.fixture
def app(tiny_env):
    return create_app(load_settings(tiny_env))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def store(app):
    return app.extensions["rlhf"]["store"]


def test_health_reports_up_with_model_class(client):
    body = client.get("/health").get_json()
    assert body["status"] == "UP" and body["model_class"]


def test_setup_returns_model_version_naming_policy_and_reward(client):
    response = client.post("/setup", json=payload("setup"))
    assert response.status_code == 200
    assert response.get_json()["model_version"] == "policy-v0.reward-v0"


def test_setup_refuses_config_without_ranker_with_one_line_reason(client):
    body = {**payload("setup"), "schema": '<View><Text name="t" value="$text"/></View>'}
    response = client.post("/setup", json=body)
    assert response.status_code == 400
    assert "Ranker" in response.get_json()["error"] and "\n" not in response.get_json()["error"]


def test_tasks_created_queues_generation_only_for_tasks_without_candidates(client, store):
    body = copy.deepcopy(payload("webhook_TASKS_CREATED"))
    body["tasks"][0]["data"]["answers"] = []
    response = client.post("/webhook", json=body)
    assert response.status_code == 200 and response.get_json()["queued_tasks"] == 1
    job = store.claim_job("test")
    assert job.kind == "generate" and job.payload["task_ids"] == [body["tasks"][0]["id"]]


def test_ranker_annotation_becomes_three_pairs_in_the_store(client, store):
    response = client.post("/webhook", json=payload("webhook_ANNOTATION_CREATED_ranker"))
    assert response.status_code == 200 and response.get_json()["pairs"] == 3
    pairs = {(p.chosen, p.rejected) for p in store.pairs()}
    assert pairs == {("0", "I think 0"), ("0", "1"), ("I think 0", "1")}


def test_repeated_annotation_event_keeps_one_copy_of_its_pairs(client, store):
    for _ in range(3):
        client.post("/webhook", json=payload("webhook_ANNOTATION_CREATED_ranker"))
    assert store.pair_count() == 3


def test_annotations_deleted_removes_their_pairs(client, store):
    created = payload("webhook_ANNOTATION_CREATED_ranker")
    client.post("/webhook", json=created)
    deleted = {**payload("webhook_ANNOTATIONS_DELETED"), "annotations": [{"id": created["annotation"]["id"]}]}
    assert client.post("/webhook", json=deleted).get_json()["deleted_annotations"] == 1
    assert store.pair_count() == 0
    assert client.post("/webhook", json=created).get_json()["applied"] is False  # a late save stays deleted
    assert store.pair_count() == 0


def test_tasks_deleted_takes_the_tasks_pairs_out_of_training(client, store):
    """Label Studio 1.23 sends the deleted tasks' ids only (OnlyIDWebhookSerializer), with the project."""
    created = payload("webhook_ANNOTATION_CREATED_ranker")
    client.post("/webhook", json=created)
    store.save_task(created["project"]["id"], created["task"]["id"], created["task"]["data"])
    deleted = {"action": "TASKS_DELETED", "tasks": [{"id": created["task"]["id"]}], "project": created["project"]}
    assert client.post("/webhook", json=deleted).get_json()["deleted_tasks"] == 1
    assert store.pair_count() == 0
    assert client.post("/webhook", json=created).get_json()["applied"] is False  # a late save stays out
    assert client.post("/webhook", json={"action": "TASKS_DELETED", "tasks": [{"id": "x"}]}).status_code == 400


def test_project_deleted_stops_the_projects_queued_jobs(client, store):
    created = payload("webhook_TASKS_CREATED")
    client.post("/webhook", json=created)
    project_id = created["project"]["id"]
    store.enqueue("generate", project_id, task_ids=[created["tasks"][0]["id"]])
    body = client.post("/webhook", json={"action": "PROJECT_DELETED", "project": {"id": project_id}}).get_json()
    assert body["stopped_jobs"] >= 1 and project_id not in store.project_ids()
    assert all(j["state"] != "queued" for j in store.jobs() if j["project"] == project_id)


def test_train_records_every_annotated_task_and_queues_one_policy_update(client, store):
    """LS 1.23 POSTs /train (its webhook flag off): every annotated task, exported, with its annotations."""
    created = payload("webhook_ANNOTATION_CREATED_ranker")
    project = created["project"]
    body = {"annotations": [{**created["task"], "annotations": [created["annotation"]]}],
            "project": f"{project['id']}.1700000000", "label_config": project["label_config"], "params": {}}
    response = client.post("/train", json=body)
    assert response.status_code == 200 and response.get_json()["applied"] == 1
    assert store.pair_count() == 3
    assert client.post("/train", json=body).get_json()["applied"] == 0  # the same version is recorded once
    assert [j["kind"] for j in store.jobs() if j["state"] == "queued"].count("train_policy") == 1
    assert client.post("/train", json={**body, "annotations": "all"}).status_code == 400


def test_cancelled_annotation_gives_no_pairs(client, store):
    body = copy.deepcopy(payload("webhook_ANNOTATION_CREATED_ranker"))
    body["annotation"]["was_cancelled"] = True
    assert client.post("/webhook", json=body).get_json()["pairs"] == 0


def test_annotation_ranking_unknown_candidate_is_refused_with_400(client, store):
    body = copy.deepcopy(payload("webhook_ANNOTATION_CREATED_ranker"))
    body["annotation"]["result"][0]["value"]["ranker"]["rank"] = ["c0", "c9"]
    response = client.post("/webhook", json=body)
    assert response.status_code == 400 and "c9" in response.get_json()["error"]
    assert store.pair_count() == 0


def test_an_update_that_cannot_be_read_clears_the_older_versions_pairs(client, store):
    created = payload("webhook_ANNOTATION_CREATED_ranker")
    client.post("/webhook", json=created)
    updated = copy.deepcopy(created)
    updated["action"] = "ANNOTATION_UPDATED"
    updated["annotation"]["updated_at"] = "2030-01-01T00:00:00Z"
    updated["annotation"]["result"][0]["value"]["ranker"]["rank"] = ["c0", "c9"]
    assert client.post("/webhook", json=updated).status_code == 400
    assert store.pair_count() == 0


def test_unknown_webhook_action_is_acknowledged_and_ignored(client):
    response = client.post("/webhook", json=payload("webhook_PROJECT_UPDATED"))
    assert response.status_code == 200 and response.get_json() == {"ignored": "PROJECT_UPDATED"}


def test_start_training_queues_a_policy_update(client, store):
    body = payload("webhook_START_TRAINING")
    client.post("/webhook", json=body)
    assert store.has_active_job("train_policy", body["project"]["id"])


@pytest.mark.parametrize("route", ["/setup", "/predict", "/webhook"])
@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"project": {"id": "x"}, "action": "TASKS_CREATED"}', b"{}"])
def test_bad_bodies_get_a_4xx_with_a_one_line_reason(client, route, body):
    response = client.post(route, data=body, content_type="application/json")
    assert 400 <= response.status_code < 500, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error and "\n" not in error


def test_unknown_route_gets_404_json(client):
    response = client.get("/nope")
    assert response.status_code == 404 and "error" in response.get_json()


def test_predict_returns_one_ranker_result_per_task_in_order(client):
    body = payload("predict_on_task_open_ranker")
    response = client.post("/predict", json=body)
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == len(body["tasks"])
    ranked = results[0]["result"][0]["value"]["ranker"]["rank"]
    assert sorted(ranked) == ["c0", "c1", "c2"]
    assert results[0]["model_version"] == "policy-v0.reward-v0"
    assert 0.0 <= results[0]["score"] <= 1.0


def test_basic_auth_guards_every_route_but_health_when_configured(tiny_env):
    app = create_app(load_settings({**tiny_env, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret"}))
    client = app.test_client()
    assert client.get("/health").status_code == 200  # liveness probes carry no credentials
    for method, route in (("get", "/status"), ("get", "/metrics"), ("post", "/webhook"), ("post", "/predict"),
                          ("post", "/setup"), ("post", "/train")):
        assert getattr(client, method)(route, json={}).status_code == 401, route
        assert getattr(client, method)(route, json={}, auth=("ls", "wrong")).status_code == 401, route
        assert getattr(client, method)(route, json={}, auth=("LS", "secret")).status_code == 401, route
    assert client.get("/status", auth=("ls", "secret")).status_code == 200


@pytest.mark.parametrize("header", ["Basic " + __import__("base64").b64encode("jürgen:pässwörd".encode()).decode(),
                                    "Basic " + __import__("base64").b64encode(b"\xff\xfe:\x00").decode(),
                                    "Basic !!!notbase64", "Bearer abc", "Basic ", "Digest username=ls"])
def test_odd_credentials_get_401_not_500(tiny_env, header):
    app = create_app(load_settings({**tiny_env, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret"}))
    assert app.test_client().get("/status", headers={"Authorization": header}).status_code == 401


def test_a_non_ascii_user_name_can_be_the_configured_one(tiny_env):
    app = create_app(load_settings({**tiny_env, "BASIC_AUTH_USER": "jürgen", "BASIC_AUTH_PASS": "pässwörd"}))
    assert app.test_client().get("/status", auth=("jürgen", "pässwörd")).status_code == 200


def test_a_body_over_the_size_limit_gets_413_unread(tiny_env):
    client = create_app(load_settings({**tiny_env, "MAX_REQUEST_MB": "1"})).test_client()
    response = client.post("/webhook", data=b"{" + b" " * (2 * 1024 * 1024) + b"}", content_type="application/json")
    assert response.status_code == 413 and "error" in response.get_json()


def test_predict_refuses_more_tasks_than_the_cap_with_the_setting_to_raise(tiny_env):
    client = create_app(load_settings({**tiny_env, "MAX_PREDICT_TASKS": "2"})).test_client()
    body = {**payload("predict_batch_via_retrieve_action_ranker")}
    body["tasks"] = [body["tasks"][0]] * 3
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and "MAX_PREDICT_TASKS" in response.get_json()["error"]


@pytest.mark.parametrize("after", ["x", "-1", "1.5", "99999999999999999999999", "²"])
def test_status_refuses_a_bad_event_cursor_with_400(client, after):
    response = client.get("/status", query_string={"after": after})
    assert response.status_code == 400 and "'after'" in response.get_json()["error"]


def test_status_without_a_cursor_shows_the_newest_events(client, store):
    for i in range(150):
        store.log_event("note", f"event {i}")
    events = client.get("/status").get_json()["events"]
    assert len(events) == 100 and events[-1]["message"] == "event 149" and events[0]["message"] == "event 50"
    newer = client.get("/status", query_string={"after": events[0]["id"]}).get_json()["events"]
    assert newer[0]["message"] == "event 51"


def test_metrics_expose_pair_count_from_the_store(client):
    client.post("/webhook", json=payload("webhook_ANNOTATION_CREATED_ranker"))
    text = client.get("/metrics").get_data(as_text=True)
    assert 'rlhf_preference_pairs{project="1"} 3.0' in text


def test_status_reports_pairwise_agreement_between_two_annotators(client):
    first = copy.deepcopy(payload("webhook_ANNOTATION_CREATED_ranker"))
    second = copy.deepcopy(first)
    second["annotation"].update(id=first["annotation"]["id"] + 1, completed_by=2)
    second["annotation"]["result"][0]["value"]["ranker"]["rank"] = ["c2", "c0", "c1"]  # flips c0 vs c2 only
    client.post("/webhook", json=first)
    client.post("/webhook", json=second)
    agreement = client.get("/status", query_string={"project": 1}).get_json()["agreement"]
    assert agreement["pairwise"] == {"rate": pytest.approx(2 / 3), "compared": 3}
    assert set(agreement["annotators"]) == {"1", "2"}


def test_setup_behind_auth_queues_securing_the_webhook_until_it_has_the_credentials(tiny_env):
    from backend.auth import webhook_auth_digest

    app = create_app(load_settings({**tiny_env, "BASIC_AUTH_USER": "ls", "BASIC_AUTH_PASS": "secret"}))
    client, store = app.test_client(), app.extensions["rlhf"]["store"]
    body = payload("setup")
    assert client.post("/setup", json=body, auth=("ls", "secret")).status_code == 200
    queued = [j for j in store.jobs() if j["kind"] == "secure_webhook"]
    assert len(queued) == 1 and queued[0]["state"] == "queued"
    store.finish_job(queued[0]["id"])
    store.set_webhook_auth(queued[0]["project"], webhook_auth_digest(("ls", "secret")))
    client.post("/setup", json=body, auth=("ls", "secret"))
    assert len([j for j in store.jobs() if j["kind"] == "secure_webhook"]) == 1  # done once, not per /setup
    assert "secret" not in str(store.events()) and "secret" not in str(store.jobs())


def test_two_projects_keep_their_own_pairs_reward_model_and_model_version(app, client, store):
    from backend.worker import Worker

    other = copy.deepcopy(payload("setup"))
    other["project"] = "2.1795774913"
    assert client.post("/setup", json=other).get_json()["model_version"] == "policy-v0.reward-v0"
    client.post("/webhook", json=payload("webhook_ANNOTATION_CREATED_ranker"))  # project 1
    job = store.claim_job("test")
    assert (job.kind, job.project_id) == ("fit_reward", 1)
    Worker(app.extensions["rlhf"]["settings"], store).run(job)

    assert client.post("/setup", json=payload("setup")).get_json()["model_version"] == "policy-v0.reward-v1"
    assert client.post("/setup", json=other).get_json()["model_version"] == "policy-v0.reward-v0"
    task = copy.deepcopy(payload("webhook_ANNOTATION_CREATED_ranker")["task"])
    versions = {p: client.post("/predict", json={"tasks": [task], "project": f"{p}.1795774913",
                                                  "label_config": payload("setup")["schema"]}).get_json()
                ["results"][0]["model_version"] for p in (1, 2)}
    assert versions == {1: "policy-v0.reward-v1", 2: "policy-v0.reward-v0"}
    status = client.get("/status").get_json()
    assert {p["id"]: p["pairs"] for p in status["projects"]} == {1: 3, 2: 0}
    assert client.get("/status", query_string={"project": 2}).get_json()["reward_versions"] == []


def test_metrics_parse_as_prometheus_text_with_latency_per_route_lane_depth_and_job_durations(client, store):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/webhook", json=payload("webhook_ANNOTATION_CREATED_ranker"))  # queues fit_reward (fast lane)
    store.enqueue("train_policy", 1)
    store.enqueue("generate", 1, task_ids=[1])
    done = store.claim_job("w", "fast")  # the refit: it goes first
    store.finish_job(done.id)
    client.get("/health")
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
    routes = {s.labels["route"] for s in families["rlhf_http_request_seconds"].samples}
    assert {"/webhook", "/health"} <= routes
    depth = {s.labels["lane"]: s.value for s in families["rlhf_lane_queued_jobs"].samples}
    assert depth == {"fast": 1, "train": 1}
    counts = [s for s in families["rlhf_job_duration_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels["kind"], s.value) for s in counts] == [("fit_reward", 1.0)]


def test_a_task_without_candidates_gets_an_empty_prediction_with_its_reason(client):
    body = copy.deepcopy(payload("predict_on_task_open_ranker"))
    body["tasks"][0]["data"]["answers"] = []
    [prediction] = client.post("/predict", json=body).get_json()["results"]
    assert prediction["result"] == [] and "no candidates" in prediction["reason"]


def test_tasks_that_match_nothing_in_the_config_get_a_400_naming_the_fields(client):
    body = copy.deepcopy(payload("predict_on_task_open_ranker"))
    body["tasks"][0]["data"] = {"text": "hello"}
    response = client.post("/predict", json=body)
    assert response.status_code == 400 and "'prompt'" in response.get_json()["error"]
    assert "['text']" in response.get_json()["error"]


def test_a_prompt_of_megabytes_is_scored_on_its_start_with_a_warning(client, caplog):
    body = copy.deepcopy(payload("predict_on_task_open_ranker"))
    body["tasks"][0]["data"]["prompt"] = "why " * 750_000  # 3 MB
    with caplog.at_level("WARNING", logger="backend.predictions"):
        response = client.post("/predict", json=body)
    assert response.status_code == 200 and response.get_json()["results"][0]["result"]
    assert "scored on its first 8000" in caplog.text
