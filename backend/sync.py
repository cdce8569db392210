"""Reconciliation: a Label Studio project's tasks and annotations in, a store equal to them out.

Label Studio sends each webhook once and never retries, so a backend that was down missed some.
Syncing reads every annotation through the API, recomputes its pairs and deletes the pairs of
annotations that no longer exist. It runs at worker start-up, on START_TRAINING and on
`rlhf-backend sync --project ID`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from label_studio_sdk import LabelStudio

from backend import labelstudio, ledger
from backend.labelconfig import parse_ranking_schema
from backend.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    tasks: int
    annotations: int
    pairs: int
    removed_annotations: int
    refused: int
    removed_tasks: int = 0

    def __str__(self) -> str:
        return (f"{self.tasks} tasks, {self.annotations} annotations -> {self.pairs} pairs; "
                f"{self.removed_annotations} deleted annotations dropped, {self.removed_tasks} deleted tasks "
                f"dropped, {self.refused} refused")


def sync_project(store: Store, client: LabelStudio, project_id: int) -> SyncReport:
    """Make the store's tasks and pairs of `project_id` equal to what Label Studio holds now."""
    config = client.projects.get(id=project_id).label_config
    store.save_project(project_id, config)
    schema = parse_ranking_schema(config)
    # read before the tasks: an annotation created while we read is then absent from both and kept,
    # instead of being taken for deleted (ledger.sync_events)
    before = store.annotation_records()
    known_tasks = store.task_ids(project_id)  # before too: a task imported while we read is not taken for deleted
    tasks = list(labelstudio.iter_tasks(client, project_id))
    for task in tasks:
        store.save_task(project_id, task["id"], task["data"])
    deleted_tasks = sum(map(len, store.delete_tasks(known_tasks - {task["id"] for task in tasks}).values()))
    events = ledger.sync_events(before, ledger.exported_saves(tasks, schema, project_id), project_id)
    for event in events:
        store.apply_annotation_event(event)
    saves = [e for e in events if isinstance(e, ledger.AnnotationSaved)]
    for refused in (e for e in saves if e.refused):
        log.warning("sync: refused annotation %s: %s", refused.annotation_id, refused.refused)
    deleted = sum(len(e.annotation_ids) for e in events if isinstance(e, ledger.AnnotationsDeleted))
    return SyncReport(tasks=len(tasks), annotations=len(saves), pairs=sum(len(e.pairs) for e in saves),
                      removed_annotations=deleted, refused=sum(bool(e.refused) for e in saves),
                      removed_tasks=deleted_tasks)
