"""Webhook events: Label Studio's JSON payloads in, store writes and queued jobs out.

Each handler does only fast, durable bookkeeping (Label Studio waits 1 s and never retries):
it records tasks or preference pairs and queues the slow work for the worker.
Handlers are idempotent and order-free: a repeated, late or reordered event leaves the same state
(the rules are backend/ledger.py's).
"""

from __future__ import annotations

import logging

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from backend import ledger
from backend.labelconfig import LabelConfigError, RankingSchema, parse_ranking_schema
from backend.preferences import AnnotationError
from backend.store import Store

log = logging.getLogger(__name__)


# Label Studio's ids are positive 32-bit integers (PostgreSQL's `integer`); a larger one is not an id
MAX_ID = 2**31 - 1
LabelStudioId = Annotated[StrictInt, Field(ge=0, le=MAX_ID)]


class PayloadError(ValueError):
    """A request body that does not match what Label Studio sends; the message says which field."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # Label Studio sends many fields the loop does not use


class ProjectRef(_Record):
    id: LabelStudioId
    label_config: str | None = None


class TaskRecord(_Record):
    id: LabelStudioId
    data: dict


class ResultItem(_Record):
    from_name: str
    type: str = ""
    value: dict


class AnnotationRecord(_Record):
    id: LabelStudioId
    result: list[ResultItem] = []
    was_cancelled: bool = False
    completed_by: LabelStudioId | dict | None = None  # a user id; some Label Studio versions send the user object

    @property
    def annotator(self) -> int | None:
        user = self.completed_by
        return user.get("id") if isinstance(user, dict) and isinstance(user.get("id"), int) else (
            user if isinstance(user, int) else None)


class IdRef(_Record):
    id: LabelStudioId


class TasksCreated(BaseModel):
    project: ProjectRef
    tasks: list[TaskRecord]


class AnnotationSaved(BaseModel):
    project: ProjectRef
    annotation: AnnotationRecord
    task: TaskRecord


class AnnotationsDeleted(BaseModel):
    annotations: list[IdRef]
    project: ProjectRef | None = None


class StartTraining(BaseModel):
    project: ProjectRef


class TasksDeleted(BaseModel):
    tasks: list[IdRef]
    project: ProjectRef | None = None  # absent when "delete all tasks" emits it


class ProjectDeleted(BaseModel):
    project: IdRef


def parse(model: type[BaseModel], payload: dict):
    """The payload as `model`, or a PayloadError naming the first bad field in one line."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        raise PayloadError(f"{where}: {error['msg']}") from None


def project_schema(store: Store, project: ProjectRef) -> RankingSchema:
    """The project's ranking schema, from the payload's label config or the one stored at /setup."""
    config = project.label_config or store.label_config(project.id)
    if not config:
        raise PayloadError(f"project {project.id} has no label_config and none was stored: connect the backend again")
    try:
        schema = parse_ranking_schema(config)
    except LabelConfigError as exc:
        raise PayloadError(str(exc)) from None
    store.save_project(project.id, config)
    return schema


def on_tasks_created(store: Store, payload: dict) -> dict:
    """Record new tasks and queue candidate generation for those without candidates."""
    event = parse(TasksCreated, payload)
    schema = project_schema(store, event.project)
    pending = []
    for task in event.tasks:
        store.save_task(event.project.id, task.id, task.data)
        if not task.data.get(schema.candidates_field):
            pending.append(task.id)
    if pending:
        store.enqueue("generate", event.project.id, task_ids=pending)
    return {"queued_tasks": len(pending)}


def on_annotation_saved(store: Store, payload: dict) -> dict:
    """ANNOTATION_CREATED/UPDATED: the newest version's pairs replace the annotation's older ones."""
    event = parse(AnnotationSaved, payload)
    schema = project_schema(store, event.project)
    annotation = {**event.annotation.model_dump(), "completed_by": event.annotation.annotator}
    try:
        saved = ledger.saved_event(annotation, event.task.model_dump(), schema, event.project.id)
    except AnnotationError as exc:  # only a malformed updated_at gets here; a bad result is recorded as refused
        raise PayloadError(str(exc)) from None
    applied = store.apply_annotation_event(saved)
    if applied:
        store.enqueue("fit_reward", event.project.id)
    if saved.refused:  # recorded first: the annotator's current answer replaces the older version's pairs
        log.warning("refused annotation %s: %s", event.annotation.id, saved.refused)
        raise PayloadError(saved.refused)
    store.log_event("pairs", f"annotation {event.annotation.id} on task {event.task.id} gave {len(saved.pairs)} pairs"
                    + ("" if applied else " (an older version than the store holds: ignored)"),
                    project=event.project.id, annotation=event.annotation.id, pairs=len(saved.pairs), applied=applied)
    return {"pairs": len(saved.pairs), "applied": applied}


def on_annotations_deleted(store: Store, payload: dict) -> dict:
    """ANNOTATIONS_DELETED (ids only): their pairs go, and a tombstone stops a late save reviving them."""
    event = parse(AnnotationsDeleted, payload)
    ids = tuple(a.id for a in event.annotations)
    project_id = event.project.id if event.project else None
    store.apply_annotation_event(ledger.AnnotationsDeleted(ids, project_id))
    store.enqueue("fit_reward", project_id)  # without a project: a refit of every project
    return {"deleted_annotations": len(ids)}


def on_tasks_deleted(store: Store, payload: dict) -> dict:
    """TASKS_DELETED (ids only): the tasks' pairs leave training; the reward model is refitted without them."""
    event = parse(TasksDeleted, payload)
    deleted = store.delete_tasks(t.id for t in event.tasks)
    for project_id, task_ids in deleted.items():
        store.enqueue("fit_reward", project_id)
        store.log_event("tasks_deleted", f"{len(task_ids)} deleted task(s) and their pairs left training",
                        project=project_id, tasks=task_ids)
    return {"deleted_tasks": sum(map(len, deleted.values()))}


def on_project_deleted(store: Store, payload: dict) -> dict:
    """PROJECT_DELETED (an organization webhook's event): its queued jobs stop; its data stays exportable."""
    event = parse(ProjectDeleted, payload)
    stopped = store.delete_project(event.project.id)
    store.log_event("project_deleted", f"project {event.project.id} was deleted in Label Studio: {stopped} queued "
                    "job(s) stopped; its tasks and pairs stay exportable", project=event.project.id)
    return {"stopped_jobs": stopped}


def on_start_training(store: Store, payload: dict) -> dict:
    """Label Studio's "Start training": sync annotations, refit the reward model, run PPO whatever the pair count."""
    event = parse(StartTraining, payload)
    project_schema(store, event.project)
    store.enqueue("sync", event.project.id)  # runs before the refit and PPO (job priority)
    store.enqueue("train_policy", event.project.id)  # absorbed by a run already queued or running
    return {"queued": "train_policy"}


class ExportedTask(_Record):
    id: LabelStudioId
    data: dict
    annotations: list[dict] = []


class TrainRequest(BaseModel):
    """`POST /train`: what Label Studio 1.23 sends instead of START_TRAINING while its webhook flag is off."""
    annotations: list[ExportedTask]  # every annotated task, as exported, with its annotations
    project: str | int  # "<id>.<created timestamp>", as to /setup (read by the web layer)
    label_config: str | None = None


def on_train(store: Store, payload: dict, project_id: int) -> dict:
    """Every annotated task Label Studio sent is recorded, then a policy update runs as for START_TRAINING."""
    event = parse(TrainRequest, payload)
    schema = project_schema(store, ProjectRef(id=project_id, label_config=event.label_config))
    tasks = [task.model_dump() for task in event.annotations]
    for task in tasks:
        store.save_task(project_id, task["id"], task["data"])
    try:
        saves = ledger.exported_saves(tasks, schema, project_id)
    except AnnotationError as exc:
        raise PayloadError(str(exc)) from None
    applied = sum(store.apply_annotation_event(saved) for saved in saves)
    store.enqueue("fit_reward", project_id)
    store.enqueue("train_policy", project_id)
    return {"annotations": len(saves), "applied": applied, "queued": "train_policy"}


HANDLERS = {
    "TASKS_CREATED": on_tasks_created,
    "ANNOTATION_CREATED": on_annotation_saved,
    "ANNOTATION_UPDATED": on_annotation_saved,
    "ANNOTATIONS_DELETED": on_annotations_deleted,
    "START_TRAINING": on_start_training,
    "TASKS_DELETED": on_tasks_deleted,
    "PROJECT_DELETED": on_project_deleted,
}


def handle_webhook(store: Store, payload: dict) -> dict:
    """Dispatch one event; events the loop does not use are acknowledged and ignored."""
    action = payload.get("action")
    if not isinstance(action, str):
        raise PayloadError("webhook body needs a string 'action'")
    handler = HANDLERS.get(action)
    if handler is None:
        return {"ignored": action}
    return {"action": action, **handler(store, payload)}
