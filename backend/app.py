"""The web layer: Label Studio's ML-backend HTTP contract in, calls into the loop's stages out.

Routes: GET /health, POST /setup, POST /predict, POST /webhook, POST /train, GET /metrics, GET /status,
GET / (the status page, its assets under /static) and GET /api/status (its data).
Every route that concerns one project's loop takes the Label Studio project it was sent for.
Each route parses the request, calls one function and returns JSON; bad input gets a 4xx with
a one-line reason. Slow work never runs here: webhooks queue jobs for the worker.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from werkzeug.exceptions import HTTPException

from backend import __version__
from backend.agreement import annotator_consistency, pairwise_agreement
from backend.auth import credentials_match, webhook_auth_digest
from backend.labelconfig import LabelConfigError, parse_ranking_schema
from backend.predictions import fields_of_config, rank_prediction
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.status import loop_status, project_summaries
from backend.store import WORKER_ALIVE_SECONDS, Store, lane_of
from backend.http_schemas import PredictRequest, SetupRequest, openapi_document
from backend.webhooks import MAX_ID, PayloadError, handle_webhook, on_train, parse

log = logging.getLogger(__name__)

MODEL_CLASS = "RLHFRanker"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_DURATION_BUCKETS = (0.1, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200)


def create_app(settings: Settings) -> Flask:
    app = Flask(__name__)
    store = Store(settings.store_url, settings.redis_url)
    settings.model_dir.mkdir(parents=True, exist_ok=True)
    store.create_schema()
    registry = ModelRegistry(settings, store)
    app.extensions["rlhf"] = {"settings": settings, "store": store, "registry": registry}

    metrics = CollectorRegistry()
    metrics.register(StoreCollector(store, registry))
    # per web process (each gunicorn worker counts its own requests); everything else is read from the store
    latency = Histogram("rlhf_http_request_seconds", "Time to answer a request, by route, method and status",
                        ["route", "method", "status"], registry=metrics, buckets=LATENCY_BUCKETS)

    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_mb * 1024 * 1024  # larger bodies: 413, unread

    @app.before_request
    def start_timer():
        g.started = time.perf_counter()

    @app.after_request
    def observe_latency(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        latency.labels(route, request.method, str(response.status_code)).observe(time.perf_counter() - g.started)
        return response

    @app.before_request
    def require_basic_auth():
        if settings.basic_auth is None or request.path == "/health":  # liveness probes carry no credentials
            return None
        if not credentials_match(request.headers.get("Authorization"), settings.basic_auth):
            return Response('{"error": "basic auth required"}\n', 401, {"WWW-Authenticate": 'Basic realm="rlhf"'},
                            mimetype="application/json")
        return None

    @app.get("/health")
    def health():
        # the web layer answers; whether anything will act on what it queues is the worker's liveness
        workers = store.live_workers(WORKER_ALIVE_SECONDS)
        return jsonify(status="UP", model_class=MODEL_CLASS, version=__version__, queue=store.queue.backend,
                       training_workers={"alive": len(workers), "busy": sum(w["job"] is not None for w in workers)})

    @app.post("/setup")
    def setup():
        body = parse(SetupRequest, json_body())
        project_id = parse_project_id(body.project)
        schema_xml = body.schema_
        try:
            parse_ranking_schema(schema_xml)
        except LabelConfigError as exc:
            raise PayloadError(str(exc)) from None
        store.save_project(project_id, schema_xml)
        # the webhook Label Studio creates for us sends no credentials: the worker gives it ours, once
        if settings.basic_auth is not None and store.webhook_auth(project_id) != webhook_auth_digest(settings.basic_auth):
            store.enqueue("secure_webhook", project_id)
        return jsonify(model_version=registry.model_version(project_id))

    @app.post("/predict")
    def predict():
        raw = json_body()
        if isinstance(raw.get("tasks"), list) and len(raw["tasks"]) > settings.max_predict_tasks:  # before parsing them
            raise PayloadError(f"'tasks' has {len(raw['tasks'])} tasks, more than MAX_PREDICT_TASKS "
                               f"{settings.max_predict_tasks}: ask for fewer at a time, or raise the setting")
        body = parse(PredictRequest, raw)
        tasks = [task.model_dump() for task in body.tasks]
        project_id = parse_project_id(body.project)  # whose reward model orders the candidates
        config = body.label_config or store.label_config(project_id)
        if not config:
            raise PayloadError("no 'label_config' in the request and none stored for the project: call /setup first")
        try:
            schema = parse_ranking_schema(config)
        except LabelConfigError as exc:
            raise PayloadError(str(exc)) from None
        if tasks and not any(fields_of_config(t, schema) for t in tasks):
            raise PayloadError(f"no task has the fields the label config names ('{schema.prompt_field}', "
                               f"'{schema.candidates_field}'), e.g. task {tasks[0].get('id')} has "
                               f"{sorted(tasks[0]['data'])[:8]}: import tasks that match the project's config")
        reward, version = registry.reward_model(project_id), registry.model_version(project_id)
        return jsonify(results=[rank_prediction(task, schema, reward, version) for task in tasks])

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(auth=settings.basic_auth is not None))

    @app.post("/webhook")
    def webhook():
        return jsonify(handle_webhook(store, json_body()))

    @app.post("/train")
    def train():
        body = json_body()
        return jsonify(on_train(store, body, parse_project_id(body.get("project"))))

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics), mimetype="text/plain; version=0.0.4")

    @app.get("/status")
    def status():
        """Every project's loop in a line; with `?project=ID`, that project's loop in full."""
        after = event_cursor(request.args.get("after"))
        body = {"projects": [p.model_dump() for p in project_summaries(store, registry)],
                "jobs": store.job_counts(), "recent_jobs": store.jobs()}
        if request.args.get("project") is None:
            return jsonify(**body, events=store.events(after_id=after))
        project_id = parse_project_id(request.args["project"])
        orders = store.pair_orders(project_id)
        return jsonify(
            **body,
            project=project_id,
            model_version=registry.model_version(project_id),
            pairs=len(orders),
            agreement={"pairwise": asdict(pairwise_agreement(orders)),
                       "annotators": {str(who): asdict(a) for who, a in annotator_consistency(orders).items()}},
            policy_versions=[vars(v) for v in store.versions("policy", project_id)],
            reward_versions=[vars(v) for v in store.versions("reward", project_id)],
            events=store.events(after_id=after, project_id=project_id),
        )

    @app.get("/")
    def status_page():
        return app.send_static_file("index.html")

    @app.get("/api/status")
    def api_status():
        project = request.args.get("project")
        return jsonify(loop_status(store, registry, None if project in (None, "") else parse_project_id(project))
                       .model_dump())

    @app.errorhandler(PayloadError)
    def bad_payload(exc: PayloadError):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return jsonify(error=f"{exc.name}: {exc.description}".splitlines()[0]), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # never leak a traceback to the client; the log keeps it
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__}); see the backend log"), 500

    return app


def json_body() -> dict:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise PayloadError("request body must be a JSON object (Content-Type: application/json)")
    return body


def event_cursor(value: str | None) -> int:
    """`/status?after=ID`: events newer than ID (0: from the first)."""
    if value is None or value == "":
        return 0
    if not re.fullmatch(r"[0-9]{1,18}", value):
        raise PayloadError(f"'after' must be an event id (a whole number >= 0), got {value[:40]!r}")
    return int(value)


def job_durations(durations: dict[str, list[float]]) -> HistogramMetricFamily:
    """Seconds from claim to done of the store's finished jobs, by kind (train_policy: a policy update)."""
    family = HistogramMetricFamily("rlhf_job_duration_seconds", "Time from claim to done of finished jobs, by kind",
                                   labels=["kind"])
    for kind, seconds in sorted(durations.items()):
        buckets = [(str(edge), sum(s <= edge for s in seconds)) for edge in JOB_DURATION_BUCKETS]
        family.add_metric([kind], buckets + [("+Inf", len(seconds))], sum_value=sum(seconds))
    return family


def parse_project_id(value) -> int:
    """Label Studio sends the project as "<id>.<created timestamp>" to /setup and /predict."""
    if isinstance(value, int) and not isinstance(value, bool):
        project_id = value
    elif isinstance(value, str) and re.fullmatch(r"\d{1,18}(\.\d{1,18})?", value):
        project_id = int(value.split(".")[0])
    else:
        raise PayloadError(f"'project' must look like \"12.1700000000\" (id.timestamp), got {str(value)[:40]!r}")
    if not 0 <= project_id <= MAX_ID:
        raise PayloadError(f"'project' {project_id} is not a Label Studio project id (0 to {MAX_ID})")
    return project_id


class StoreCollector:
    """Prometheus gauges read from the store at scrape time, so every gunicorn worker reports the same."""

    def __init__(self, store: Store, registry: ModelRegistry):
        self.store, self.registry = store, registry

    def collect(self):
        pairs = GaugeMetricFamily("rlhf_preference_pairs", "Preference pairs in the store", labels=["project"])
        policy = GaugeMetricFamily("rlhf_policy_version", "Newest published policy version", labels=["project"])
        reward = GaugeMetricFamily("rlhf_reward_version", "Newest published reward-model version", labels=["project"])
        accuracy = GaugeMetricFamily("rlhf_reward_held_out_accuracy", "Pairwise accuracy of the serving reward "
                                     "model on held-out prompts", labels=["project"])
        for project_id in self.store.project_ids():
            label = [str(project_id)]
            pairs.add_metric(label, self.store.pair_count(project_id))
            policy.add_metric(label, self.registry.policy_version(project_id))
            latest = self.store.latest_version("reward", project_id)
            reward.add_metric(label, latest.version if latest else 0)
            if latest and latest.metrics.get("held_out_accuracy") is not None:
                accuracy.add_metric(label, latest.metrics["held_out_accuracy"])
        yield from (pairs, policy, reward, accuracy)
        yield GaugeMetricFamily("rlhf_training_workers_alive", "Training workers that beat within "
                                f"{WORKER_ALIVE_SECONDS:.0f} s", value=len(self.store.live_workers(WORKER_ALIVE_SECONDS)))
        jobs = GaugeMetricFamily("rlhf_jobs", "Jobs in the queue by state", labels=["state"])
        for state, count in self.store.job_counts().items():
            jobs.add_metric([state], count)
        yield jobs
        depth = GaugeMetricFamily("rlhf_lane_queued_jobs", "Queued jobs waiting for each lane's workers", labels=["lane"])
        queued = [lane_of(j["kind"]) for j in self.store.active_jobs() if j["state"] == "queued"]
        for lane in ("fast", "train"):
            depth.add_metric([lane], queued.count(lane))
        yield depth
        yield job_durations(self.store.job_durations())
