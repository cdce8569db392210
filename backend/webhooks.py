"""Webhook events: Label Studio's JSON payloads in, store writes and queued jobs out.

Each handler does only fast, durable bookkeeping (Label Studio waits 1 s and never retries):
it records tasks or preference pairs and queues the slow work for the worker.
Handlers are idempotent: a repeated event leaves the same state.
"""

from __future__ import annotations

import logging

from backend.labelconfig import LabelConfigError, RankingSchema, parse_ranking_schema
from backend.preferences import AnnotationError, annotation_pairs
from backend.store import Store

log = logging.getLogger(__name__)


class PayloadError(ValueError):
    """A request body that does not match what Label Studio sends; the message says which field."""


def _object(payload: dict, key: str) -> dict:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise PayloadError(f"'{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _id(obj: dict, what: str) -> int:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{what} needs an integer 'id', got {value!r}")
    return value


def project_schema(store: Store, project: dict) -> tuple[int, RankingSchema]:
    """The project's id and ranking schema, from the payload's label config or the one stored at /setup."""
    project_id = _id(project, "project")
    config = project.get("label_config") or store.label_config(project_id)
    if not config:
        raise PayloadError(f"project {project_id} has no label_config and none was stored: connect the backend again")
    try:
        schema = parse_ranking_schema(config)
    except LabelConfigError as exc:
        raise PayloadError(str(exc)) from None
    store.save_project(project_id, config)
    return project_id, schema


def on_tasks_created(store: Store, payload: dict) -> dict:
    """Record new tasks and queue candidate generation for those without candidates."""
    project_id, schema = project_schema(store, _object(payload, "project"))
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        raise PayloadError(f"'tasks' must be a list, got {type(tasks).__name__}")
    pending = []
    for task in tasks:
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise PayloadError("each task needs an integer 'id' and a 'data' object")
        task_id = _id(task, "task")
        store.save_task(project_id, task_id, task["data"])
        if not task["data"].get(schema.candidates_field):
            pending.append(task_id)
    if pending:
        store.enqueue("generate", project_id, task_ids=pending)
    return {"queued_tasks": len(pending)}


def on_annotation_saved(store: Store, payload: dict) -> dict:
    """ANNOTATION_CREATED/UPDATED: the annotation's pairs replace any it had; a reward refit is queued."""
    project_id, schema = project_schema(store, _object(payload, "project"))
    annotation, task = _object(payload, "annotation"), _object(payload, "task")
    annotation_id, _ = _id(annotation, "annotation"), _id(task, "task")
    try:
        pairs = annotation_pairs(annotation, task, schema, project_id)
    except AnnotationError as exc:
        log.warning("refused annotation %s: %s", annotation_id, exc)
        raise PayloadError(str(exc)) from None
    store.replace_annotation_pairs(annotation_id, [p.as_row() for p in pairs])
    store.enqueue("fit_reward", None)
    store.log_event("pairs", f"annotation {annotation_id} on task {task['id']} gave {len(pairs)} pairs",
                    annotation=annotation_id, pairs=len(pairs))
    return {"pairs": len(pairs)}


def on_annotations_deleted(store: Store, payload: dict) -> dict:
    annotations = payload.get("annotations")
    if not isinstance(annotations, list):
        raise PayloadError(f"'annotations' must be a list of {{\"id\": N}}, got {type(annotations).__name__}")
    ids = [_id(a, "annotation") if isinstance(a, dict) else _id({}, "annotation") for a in annotations]
    removed = store.delete_annotation_pairs(ids)
    if removed:
        store.enqueue("fit_reward", None)
    return {"removed_pairs": removed}


def on_start_training(store: Store, payload: dict) -> dict:
    """Label Studio's "Start training": sync annotations, refit the reward model, run PPO whatever the pair count."""
    project_id, _ = project_schema(store, _object(payload, "project"))
    store.enqueue("sync", project_id)  # runs before the refit and PPO (job priority)
    store.enqueue("train_policy", project_id)  # absorbed by a run already queued or running
    return {"queued": "train_policy"}


HANDLERS = {
    "TASKS_CREATED": on_tasks_created,
    "ANNOTATION_CREATED": on_annotation_saved,
    "ANNOTATION_UPDATED": on_annotation_saved,
    "ANNOTATIONS_DELETED": on_annotations_deleted,
    "START_TRAINING": on_start_training,
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
