"""Ledger: annotation events in, the live preference pairs out; a pure model of durable event semantics.

Label Studio sends each webhook once, unordered across gunicorn workers, and never retries;
a sync from its export may replay any of them. So the state after a set of events must not
depend on their order or on repeats. The rules that give this:
- Keyed by annotation id: several annotators' annotations of one task are independent.
- A save (ANNOTATION_CREATED/UPDATED, or an annotation read back from an export) is one version
  of the annotation, ordered by Label Studio's `updated_at`; the newest version's pairs replace
  all earlier ones. Equal stamps with different content (never seen from Label Studio) are
  ordered by a content fingerprint, so even then the winner does not depend on arrival order.
- ANNOTATIONS_DELETED leaves a tombstone that no save overrides, however late it arrives or
  however new its stamp: Label Studio never reuses an annotation id (Django's SQLite AutoField
  is AUTOINCREMENT; PostgreSQL uses a sequence), so a save after a delete is a stale event.
- A version that cannot be read (an `AnnotationError`) still replaces the older version's pairs,
  with none: the annotator's current answer is the refused one, so the older pairs are stale.

`apply` is the whole rule; `Store` mirrors it in SQL with the same `accepts` test.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from backend.labelconfig import RankingSchema
from backend.preferences import AnnotationError, PreferencePair, annotation_pairs

NEVER = datetime.min.replace(tzinfo=UTC)  # the stamp of a version that came without one: any stamped one wins


@dataclass(frozen=True)
class AnnotationSaved:
    """One version of one annotation, with the pairs it implies."""

    annotation_id: int
    project_id: int
    task_id: int
    updated_at: datetime | None
    pairs: tuple[PreferencePair, ...]
    refused: str | None = None  # why this version gives no pairs, if it could not be read

    @property
    def fingerprint(self) -> str:
        content = json.dumps([[asdict(p) for p in self.pairs], self.refused], sort_keys=True, default=str)
        return hashlib.sha256(content.encode()).hexdigest()


@dataclass(frozen=True)
class AnnotationsDeleted:
    annotation_ids: tuple[int, ...]
    project_id: int | None = None


@dataclass(frozen=True)
class AnnotationRecord:
    """What the ledger keeps per annotation id: its newest version, or its tombstone."""

    annotation_id: int
    project_id: int | None
    task_id: int | None
    updated_at: datetime | None
    fingerprint: str
    deleted: bool
    pairs: tuple[PreferencePair, ...] = ()
    refused: str | None = None

    @property
    def version(self) -> tuple[datetime, str]:
        return (self.updated_at or NEVER, self.fingerprint)


Ledger = Mapping[int, AnnotationRecord]
Event = AnnotationSaved | AnnotationsDeleted


def parse_time(stamp: str | None) -> datetime | None:
    """Label Studio's ISO stamp ("2026-11-27T10:22:19.063836Z") as an aware datetime; None if absent."""
    if stamp is None:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except (TypeError, ValueError):
        raise AnnotationError(f"updated_at must be an ISO 8601 time, got {stamp!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def saved_event(annotation: dict, task: dict, schema: RankingSchema, project_id: int) -> AnnotationSaved:
    """The ledger event of one annotation version (webhook or export); an unreadable one is recorded as refused."""
    updated_at = parse_time(annotation.get("updated_at"))
    try:
        pairs, refused = tuple(annotation_pairs(annotation, task, schema, project_id)), None
    except AnnotationError as exc:
        pairs, refused = (), str(exc)
    return AnnotationSaved(annotation_id=int(annotation["id"]), project_id=project_id, task_id=int(task["id"]),
                           updated_at=updated_at, pairs=pairs, refused=refused)


def accepts(current: AnnotationRecord | None, event: AnnotationSaved) -> bool:
    """Whether a save replaces what the ledger holds for its annotation."""
    if current is None:
        return True
    if current.deleted:
        return False
    return (event.updated_at or NEVER, event.fingerprint) > current.version


def apply(state: Ledger, event: Event) -> dict[int, AnnotationRecord]:
    """The ledger after one event; `state` is left as it was."""
    new = dict(state)
    if isinstance(event, AnnotationsDeleted):
        for annotation_id in event.annotation_ids:
            # The tombstone keeps nothing of the version it replaces, so delete-then-save and
            # save-then-delete end in the same record.
            new[annotation_id] = AnnotationRecord(annotation_id, event.project_id, None, None, "", deleted=True)
        return new
    if accepts(state.get(event.annotation_id), event):
        new[event.annotation_id] = AnnotationRecord(
            annotation_id=event.annotation_id, project_id=event.project_id, task_id=event.task_id,
            updated_at=event.updated_at, fingerprint=event.fingerprint, deleted=False,
            pairs=event.pairs, refused=event.refused,
        )
    return new


def replay(events: Iterable[Event], state: Ledger | None = None) -> dict[int, AnnotationRecord]:
    result = dict(state or {})
    for event in events:
        result = apply(result, event)
    return result


def live_pairs(state: Ledger, project_id: int | None = None) -> list[PreferencePair]:
    """Every live annotation's pairs, by annotation id."""
    return [pair for _, record in sorted(state.items()) if not record.deleted
            and (project_id is None or record.project_id == project_id) for pair in record.pairs]


def exported_saves(tasks: Iterable[dict], schema: RankingSchema, project_id: int) -> list[AnnotationSaved]:
    """Saves for every annotation of a Label Studio JSON export (tasks with their `annotations`)."""
    return [saved_event(annotation, task, schema, project_id)
            for task in tasks for annotation in task.get("annotations") or []]


def sync_events(state: Ledger, exported: Iterable[AnnotationSaved], project_id: int) -> list[Event]:
    """Events that bring the ledger level with a full export of the project (a missed webhook's repair).

    Every exported annotation is saved (a no-op where the ledger already has that version); a live
    annotation of the project that the export lacks was deleted while no webhook reached us.
    Pass `state` as it was BEFORE the export was read: an annotation created while the export
    ran is then absent from both and kept, instead of being taken for deleted (a tombstone is forever).
    """
    saves = list(exported)
    present = {event.annotation_id for event in saves}
    gone = tuple(sorted(a for a, r in state.items()
                        if not r.deleted and r.project_id == project_id and a not in present))
    return [*saves, *([AnnotationsDeleted(gone, project_id)] if gone else [])]
