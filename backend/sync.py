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

from backend import labelstudio
from backend.labelconfig import parse_ranking_schema
from backend.preferences import AnnotationError, annotation_pairs
from backend.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    tasks: int
    annotations: int
    pairs: int
    removed_annotations: int
    refused: int

    def __str__(self) -> str:
        return (f"{self.tasks} tasks, {self.annotations} annotations -> {self.pairs} pairs; "
                f"{self.removed_annotations} deleted annotations dropped, {self.refused} refused")


def sync_project(store: Store, client: LabelStudio, project_id: int) -> SyncReport:
    """Make the store's tasks and pairs of `project_id` equal to what Label Studio holds now."""
    config = client.projects.get(id=project_id).label_config
    store.save_project(project_id, config)
    schema = parse_ranking_schema(config)
    seen, tasks, pairs, refused = set(), 0, 0, 0
    for task in labelstudio.iter_tasks(client, project_id):
        tasks += 1
        store.save_task(project_id, task["id"], task["data"])
        for annotation in task.get("annotations") or []:
            seen.add(annotation["id"])
            try:
                annotation_pair_list = annotation_pairs(annotation, task, schema, project_id)
            except AnnotationError as exc:
                log.warning("sync: refused annotation %s: %s", annotation["id"], exc)
                refused += 1
                annotation_pair_list = []
            store.replace_annotation_pairs(annotation["id"], [p.as_row() for p in annotation_pair_list])
            pairs += len(annotation_pair_list)
    stale = store.annotation_ids(project_id) - seen
    store.delete_annotation_pairs(stale)
    return SyncReport(tasks, len(seen), pairs, len(stale), refused)
