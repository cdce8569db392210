"""The HTTP contract as schemas: every route's request and response bodies in, the OpenAPI document out.

The web layer validates `/setup` and `/predict` bodies with the models here and webhook events with
backend/webhooks.py's; `openapi_document()` builds `GET /openapi.json` from the same models, so the
document cannot drift from what the routes accept.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from backend import __version__
from backend.status import LoopStatus
from backend.webhooks import (
    AnnotationSaved,
    AnnotationsDeleted,
    LabelStudioId,
    ProjectDeleted,
    StartTraining,
    TasksCreated,
    TasksDeleted,
    TrainRequest,
)

# "<id>.<created timestamp>" as Label Studio sends it to /setup and /predict, or the bare id
PROJECT_PATTERN = r"^\d{1,18}(\.\d{1,18})?$"
ProjectKey = Annotated[str, Field(pattern=PROJECT_PATTERN)] | LabelStudioId


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # Label Studio sends more than the backend reads


class SetupRequest(_Open):
    project: ProjectKey = Field(description='The project as "<id>.<created timestamp>" (or its id)')
    schema_: str = Field(alias="schema", description="The project's label config XML")


class PredictTask(_Open):
    id: LabelStudioId | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class PredictRequest(_Open):
    tasks: list[PredictTask]
    project: ProjectKey = Field(description='The project as "<id>.<created timestamp>" (or its id)')
    label_config: str | None = None


class Prediction(BaseModel):
    result: list[dict[str, Any]]
    score: float
    model_version: str
    reason: str | None = Field(None, description="Why the result is empty, when it is")


class PredictResponse(BaseModel):
    results: list[Prediction]


class SetupResponse(BaseModel):
    model_version: str


class TrainingWorkers(BaseModel):
    alive: int
    busy: int


class HealthResponse(BaseModel):
    status: Literal["UP"]
    model_class: str
    version: str
    training_workers: TrainingWorkers


class ErrorResponse(BaseModel):
    error: str = Field(description="One line: the field, the value and the fix")


class OtherEvent(_Open):
    """Any other Label Studio event: acknowledged and ignored."""
    action: str


WEBHOOK_EVENTS: dict[str, type[BaseModel]] = {
    "TASKS_CREATED": TasksCreated, "ANNOTATION_CREATED": AnnotationSaved, "ANNOTATION_UPDATED": AnnotationSaved,
    "ANNOTATIONS_DELETED": AnnotationsDeleted, "START_TRAINING": StartTraining, "TASKS_DELETED": TasksDeleted,
    "PROJECT_DELETED": ProjectDeleted,
}


def _event_model(action: str, model: type[BaseModel]) -> type[BaseModel]:
    name = "".join(part.title() for part in action.split("_")) + "Event"
    return create_model(name, __base__=model, action=(Literal[action], ...))


EVENT_MODELS = [_event_model(action, model) for action, model in WEBHOOK_EVENTS.items()]


def _body(ref: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _answer(description: str, ref: str | None = None, media: str = "application/json") -> dict:
    schema = {"$ref": ref} if ref else {"type": "object" if media == "application/json" else "string"}
    return {"description": description, "content": {media: {"schema": schema}}}


def openapi_document(auth: bool) -> dict:
    """OpenAPI 3.1 of every route; with `auth`, every route but /health needs HTTP basic auth."""
    models = [SetupRequest, PredictRequest, PredictResponse, SetupResponse, HealthResponse, ErrorResponse,
              TrainRequest, OtherEvent, LoopStatus, *EVENT_MODELS]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    schemas = top["$defs"]
    schemas["WebhookEvent"] = {"oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in EVENT_MODELS]
                               + [{"$ref": "#/components/schemas/OtherEvent"}]}
    ref = "#/components/schemas/".__add__
    bad = {"400": _answer("Bad input, in one line", ref("ErrorResponse")),
           "413": _answer("Body larger than MAX_REQUEST_MB", ref("ErrorResponse"))}
    project_query = {"name": "project", "in": "query", "required": False,
                     "schema": {"type": "string", "pattern": PROJECT_PATTERN}}
    after_query = {"name": "after", "in": "query", "required": False, "schema": {"type": "string", "pattern": r"^\d+$"}}
    paths = {
        "/health": {"get": {"summary": "Liveness, open without credentials", "security": [],
                            "responses": {"200": _answer("Up", ref("HealthResponse"))}}},
        "/setup": {"post": {"summary": "Label Studio checks the connection and learns the project's config",
                            "requestBody": _body(ref("SetupRequest")),
                            "responses": {"200": _answer("The project's model version", ref("SetupResponse")), **bad}}},
        "/predict": {"post": {"summary": "Candidates pre-ordered by the project's reward model",
                              "requestBody": _body(ref("PredictRequest")),
                              "responses": {"200": _answer("One prediction per task", ref("PredictResponse")), **bad}}},
        "/webhook": {"post": {"summary": "Label Studio's events: recorded, slow work queued",
                              "requestBody": _body(ref("WebhookEvent")),
                              "responses": {"200": _answer("Acknowledged", None), **bad}}},
        "/train": {"post": {"summary": "'Start training' without the webhook flag: every annotated task",
                            "requestBody": _body(ref("TrainRequest")),
                            "responses": {"200": _answer("A policy update queued", None), **bad}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": _answer("Prometheus text format", media="text/plain")}}},
        "/status": {"get": {"summary": "Every project's loop in a line; with ?project, one in full",
                            "parameters": [project_query, after_query],
                            "responses": {"200": _answer("The loop's state", None), **bad}}},
        "/api/status": {"get": {"summary": "The status page's data for one project",
                                "parameters": [project_query],
                                "responses": {"200": _answer("LoopStatus", ref("LoopStatus")), **bad}}},
        "/": {"get": {"summary": "The status page", "responses": {"200": _answer("HTML", media="text/html")}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _answer("OpenAPI 3.1", None)}}},
    }
    document = {"openapi": "3.1.0", "info": {"title": "rlhf-backend", "version": __version__}, "paths": paths,
                "components": {"schemas": schemas}}
    if auth:
        document["components"]["securitySchemes"] = {"basic": {"type": "http", "scheme": "basic"}}
        document["security"] = [{"basic": []}]
        for operations in paths.values():
            for operation in operations.values():
                operation["responses"]["401"] = _answer("Credentials missing or wrong", ref("ErrorResponse"))
        paths["/health"]["get"]["responses"].pop("401")
    return document
