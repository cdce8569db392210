"""The durable store: every piece of loop state, in one SQL database under MODEL_DIR.

In: tasks, annotations' preference pairs, model versions and jobs from the other stages.
Out: the same, queried. SQLite in WAL mode by default (several gunicorn workers and the
training worker share it); any SQLAlchemy URL (e.g. PostgreSQL) via DATABASE_URL.
Nothing here is cached in process memory, so every process sees every other's writes.
Jobs are rows here (the truth of what must happen); their ids travel to workers on the job queue
(jobqueue.py), which this store announces to after each commit.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import socket
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command as alembic_command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from backend import ledger
from backend.jobqueue import QUEUE_LANES, JobQueue, QueueUnavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x726C6866  # "rlhf": the PostgreSQL advisory lock held while migrating


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # Label Studio project id
    label_config: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)
    # deleted in Label Studio: its jobs stop, its tasks and pairs stay exportable
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # sha256 of the Authorization header the worker gave the project's webhook (never the header itself)
    webhook_auth: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TaskRow(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # Label Studio task id
    project_id: Mapped[int] = mapped_column(Integer, index=True)
    data: Mapped[dict] = mapped_column(JSON)  # the task's data as last written to Label Studio
    policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of its candidates
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now, onupdate=_now)


class AnnotationRow(Base):
    """The newest version of each annotation the loop has seen, or its tombstone (see backend/ledger.py)."""

    __tablename__ = "annotations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # Label Studio annotation id, never reused
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)  # of the kept version
    fingerprint: Mapped[str] = mapped_column(String(64), default="")
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)  # a tombstone: no later save revives it
    refused: Mapped[str | None] = mapped_column(Text, nullable=True)  # why the kept version gave no pairs


class PairRow(Base):
    __tablename__ = "preference_pairs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int] = mapped_column(Integer, index=True)
    task_id: Mapped[int] = mapped_column(Integer, index=True)
    annotation_id: Mapped[int] = mapped_column(Integer, index=True)
    annotator: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    margin: Mapped[float] = mapped_column(Float, default=0.0)
    chosen_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # candidate ids within the task
    rejected_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    chosen_policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rejected_policy_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class ModelVersionRow(Base):
    """A published model of one project's lineage. project_id NULL: published before projects had their own
    loops (migration 0006); such versions are the common ancestry of every project."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("project_id", "kind", "version", name="uq_model_versions_project_kind_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # "policy" | "reward"
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    pairs_seen: Mapped[int] = mapped_column(Integer, default=0)  # pairs in the store when its run started
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    retired: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")  # rolled back: never served
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower runs first
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)  # queued|running|done|failed
    # "kind:project" while the job may absorb or block twins; unique, so two processes cannot queue twins
    active_key: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # claims so far
    # the lease: the running job's worker beats; a job whose beat is older than the lease is retried
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class WorkerRow(Base):
    """A worker process's liveness: /health and /metrics read it, from any web worker."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the job it runs


class EmbeddingRow(Base):
    __tablename__ = "embeddings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(encoder + text)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32 little-endian


class EventRow(Base):
    """A human-readable log of what the loop did, for the demo, the status API and debugging."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # None: the whole backend
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


# Lower runs first: a reward refit takes milliseconds and makes /predict current, PPO takes minutes.
JOB_PRIORITY = {"sync": 0, "fit_reward": 0, "secure_webhook": 0, "generate": 1, "regenerate": 1, "train_policy": 2}
# A worker beats every HEARTBEAT_SECONDS; a running job whose worker has not beaten for JOB_LEASE_SECONDS
# was lost with it (SIGKILL, OOM, a dead machine) and is retried, at most MAX_JOB_ATTEMPTS claims in all.
HEARTBEAT_SECONDS = 5.0
JOB_LEASE_SECONDS = 60.0
MAX_JOB_ATTEMPTS = 3
WORKER_ALIVE_SECONDS = 3 * HEARTBEAT_SECONDS  # /health and /metrics count a worker alive within this
# Which job kinds a worker of each lane claims: candidates and reward updates never wait behind a policy
# update that takes minutes. "all" is one worker doing everything (its jobs by priority).
LANES = {
    "fast": frozenset({"sync", "fit_reward", "secure_webhook", "generate", "regenerate"}),
    "train": frozenset({"train_policy"}),
}
LANES["all"] = LANES["fast"] | LANES["train"]
# A queued job whose message is older than this and not on its lane's (empty) queue lost its message:
# its worker died between taking it and claiming the job, or the queue was down when it was queued.
LOST_MESSAGE_SECONDS = 5.0


def lane_of(kind: str) -> str:
    """The lane whose workers run jobs of `kind`: "fast" or "train"."""
    return "train" if kind in LANES["train"] else "fast"
# Kinds of which at most one may be queued or running per project: "Start training" and the automatic
# trigger fold into one policy update of the project.
EXCLUSIVE_KINDS = {"train_policy"}


def worker_name(pid: int) -> str:
    """How a worker process is known in the store (and how its supervisor finds its jobs)."""
    return f"{socket.gethostname()}:{pid}"


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    project_id: int | None
    payload: dict


@dataclass(frozen=True)
class ModelVersion:
    kind: str
    version: int
    path: str
    pairs_seen: int
    metrics: dict
    retired: bool = False
    project_id: int | None = None  # None: published before projects had their own loops


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets readers (web workers) run beside the one writer; busy_timeout makes writers wait, not fail.
    # pysqlite starts transactions lazily at the first write, so a read-modify-write of two processes
    # would interleave and lose an update; we issue BEGIN ourselves (see _begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin(connection) -> None:
    # IMMEDIATE takes the write lock up front, so the reads of a writing transaction cannot go stale.
    connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get("immediate") else "BEGIN")


class Store:
    """All loop state. One instance per process; it holds a connection pool, no data."""

    def __init__(self, url: str, redis_url: str = ""):
        self.engine: Engine = create_engine(url)
        self.queue = JobQueue(url, redis_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _begin)
        self._sessions = sessionmaker(self.engine.execution_options(immediate=True), expire_on_commit=False)
        # reads begin deferred: in WAL mode they read a snapshot beside the writer, never taking its lock
        self._reads = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Bring the database to the newest schema with Alembic; safe to call from several processes at once."""
        # two processes migrating an empty database would both create the same tables
        with _named_lock(self.engine, "migrate", MIGRATION_LOCK_KEY), self.engine.begin() as connection:
            config = AlembicConfig()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            alembic_command.upgrade(config, "head")

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Work only one process may do at a time, whichever lane or machine it runs on (a reward fit:
        two would write the same version directory)."""
        with _named_lock(self.engine, name, zlib.crc32(name.encode()) & 0x7FFFFFFF):
            yield

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A writing transaction: on SQLite it takes the write lock when it begins (BEGIN IMMEDIATE)."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: one consistent snapshot, without the write lock."""
        with self._reads.begin() as session:
            yield session

    # --- projects and tasks ---
    def save_project(self, project_id: int, label_config: str) -> None:
        """Every webhook carries the config: only a new project or a changed config is written."""
        with self.reading() as s:
            row = s.get(ProjectRow, project_id)
            if row is not None and (not label_config or row.label_config == label_config):
                return
        with self.session() as s:
            row = s.get(ProjectRow, project_id)
            if row is None:
                s.add(ProjectRow(id=project_id, label_config=label_config))
            elif label_config and row.label_config != label_config:
                row.label_config = label_config

    def label_config(self, project_id: int) -> str | None:
        with self.reading() as s:
            row = s.get(ProjectRow, project_id)
            return row.label_config if row and row.label_config else None

    def save_task(self, project_id: int, task_id: int, data: dict, policy_version: int | None = None) -> None:
        with self.session() as s:
            row = s.get(TaskRow, task_id)
            if row is None:
                s.add(TaskRow(id=task_id, project_id=project_id, data=data, policy_version=policy_version))
            else:
                row.project_id, row.data = project_id, data
                if policy_version is not None:
                    row.policy_version = policy_version

    def delete_tasks(self, task_ids: Iterable[int]) -> dict[int, list[int]]:
        """Tasks deleted in Label Studio leave training: their annotations become tombstones (a late save
        cannot revive them), their pairs go, their rows go. Returns the stored tasks deleted, by project."""
        ids = list(task_ids)
        if not ids:
            return {}
        with self.session() as s:
            deleted = _by_project(s.execute(select(TaskRow.project_id, TaskRow.id).where(TaskRow.id.in_(ids))))
            for project_id, in_project in deleted.items():
                annotations = set(s.scalars(select(PairRow.annotation_id).where(PairRow.task_id.in_(in_project))))
                annotations |= set(s.scalars(select(AnnotationRow.id).where(AnnotationRow.task_id.in_(in_project))))
                _tombstone(s, annotations, project_id)  # as ANNOTATIONS_DELETED does
            s.execute(delete(PairRow).where(PairRow.task_id.in_(ids)))
            s.execute(delete(TaskRow).where(TaskRow.id.in_(ids)))
            return deleted

    def task_ids(self, project_id: int) -> set[int]:
        with self.reading() as s:
            return set(s.scalars(select(TaskRow.id).where(TaskRow.project_id == project_id)))

    def project_ids(self) -> list[int]:
        """Projects that still exist in Label Studio, as far as the loop knows."""
        with self.reading() as s:
            return list(s.scalars(select(ProjectRow.id).where(ProjectRow.deleted_at.is_(None)).order_by(ProjectRow.id)))

    def delete_project(self, project_id: int) -> int:
        """A project deleted in Label Studio: marked deleted, its queued jobs failed with the reason.
        Its tasks and pairs stay, for export. Returns how many queued jobs were stopped."""
        with self.session() as s:
            row = s.get(ProjectRow, project_id)
            if row is None:
                s.add(ProjectRow(id=project_id, label_config="", deleted_at=_now()))
            elif row.deleted_at is None:
                row.deleted_at = _now()
            stopped = s.execute(update(JobRow).where(JobRow.project_id == project_id, JobRow.state == "queued").values(
                state="failed", error=f"project {project_id} was deleted in Label Studio", finished_at=_now(),
                active_key=None))
            return stopped.rowcount or 0

    def webhook_auth(self, project_id: int) -> str | None:
        with self.reading() as s:
            row = s.get(ProjectRow, project_id)
            return row.webhook_auth if row else None

    def set_webhook_auth(self, project_id: int, digest: str) -> None:
        with self.session() as s:
            row = s.get(ProjectRow, project_id)
            if row is not None:
                row.webhook_auth = digest

    def project_deleted(self, project_id: int) -> bool:
        with self.reading() as s:
            row = s.get(ProjectRow, project_id)
            return row is not None and row.deleted_at is not None

    def tasks(self, task_ids: Iterable[int]) -> dict[int, dict]:
        with self.reading() as s:
            rows = s.scalars(select(TaskRow).where(TaskRow.id.in_(list(task_ids))))
            return {r.id: dict(r.data) for r in rows}

    def task_policy_versions(self, project_id: int) -> dict[int, int | None]:
        with self.reading() as s:
            rows = s.execute(select(TaskRow.id, TaskRow.policy_version).where(TaskRow.project_id == project_id))
            return {task_id: version for task_id, version in rows}

    def task_data_of_version(self, project_id: int, policy_version: int, limit: int) -> list[dict]:
        """Data of up to `limit` of the project's tasks whose candidates policy `policy_version` wrote."""
        with self.reading() as s:
            query = (select(TaskRow.data).where(TaskRow.project_id == project_id,
                                                TaskRow.policy_version == policy_version)
                     .order_by(TaskRow.id.desc()).limit(limit))
            return [dict(d) for d in s.scalars(query)]

    def project_task_data(self, project_id: int | None = None) -> list[dict]:
        with self.reading() as s:
            query = select(TaskRow.data).order_by(TaskRow.id)
            if project_id is not None:
                query = query.where(TaskRow.project_id == project_id)
            return [dict(d) for d in s.scalars(query)]

    # --- annotations and their preference pairs ---
    def apply_annotation_event(self, event: ledger.Event) -> bool:
        """Apply one annotation event by the ledger's rules; False when the store already holds newer."""
        with self.session() as s:
            if isinstance(event, ledger.AnnotationsDeleted):
                _tombstone(s, event.annotation_ids, event.project_id)
                return True
            row, created = _locked_annotation(s, event.annotation_id)
            if not ledger.accepts(None if created else _annotation_record(row), event):
                return False
            row.project_id, row.task_id, row.updated_at = event.project_id, event.task_id, event.updated_at
            row.fingerprint, row.deleted, row.refused = event.fingerprint, False, event.refused
            s.execute(delete(PairRow).where(PairRow.annotation_id == event.annotation_id))
            s.add_all(PairRow(**{**pair.as_row(), "annotation_id": event.annotation_id}) for pair in event.pairs)
            return True

    def annotation_ids(self, project_id: int) -> set[int]:
        """Live (not deleted) annotations of the project, with or without pairs."""
        with self.reading() as s:
            query = select(AnnotationRow.id).where(AnnotationRow.project_id == project_id,
                                                   AnnotationRow.deleted.is_(False))
            return set(s.scalars(query))

    def annotation_outcomes(self, project_id: int, task_ids: Iterable[int]) -> dict[int, list[list[tuple]]]:
        """Live, readable annotations of these tasks -> for each, its pairs' (chosen, rejected) policy versions."""
        task_ids = list(task_ids)
        with self.reading() as s:
            annotations = list(s.execute(select(AnnotationRow.id, AnnotationRow.task_id).where(
                AnnotationRow.project_id == project_id, AnnotationRow.task_id.in_(task_ids),
                AnnotationRow.deleted.is_(False), AnnotationRow.refused.is_(None))))
            pairs: dict[int, list[tuple]] = {}
            for annotation_id, chosen, rejected in s.execute(
                    select(PairRow.annotation_id, PairRow.chosen_policy_version, PairRow.rejected_policy_version)
                    .where(PairRow.annotation_id.in_([a for a, _ in annotations]))):
                pairs.setdefault(annotation_id, []).append((chosen, rejected))
        outcomes: dict[int, list[list[tuple]]] = {}
        for annotation_id, task_id in annotations:
            outcomes.setdefault(task_id, []).append(pairs.get(annotation_id, []))
        return outcomes

    def annotation_records(self) -> dict[int, ledger.AnnotationRecord]:
        with self.reading() as s:
            return {row.id: _annotation_record(row) for row in s.scalars(select(AnnotationRow))}

    def pairs(self, project_id: int | None = None) -> list[PairRow]:
        with self.reading() as s:
            query = select(PairRow).order_by(PairRow.id)
            if project_id is not None:
                query = query.where(PairRow.project_id == project_id)
            return list(s.scalars(query))

    def pair_orders(self, project_id: int | None = None) -> list[dict]:
        """Who ordered what, without the texts: task, annotator and the two candidates of every pair.

        Candidates are their ids in the task, or their texts where a pair has no ids. What agreement
        needs, at a fraction of the cost of reading every pair's prompt and answers.
        """
        query = select(PairRow.task_id, PairRow.annotator, func.coalesce(PairRow.chosen_id, PairRow.chosen),
                       func.coalesce(PairRow.rejected_id, PairRow.rejected)).order_by(PairRow.id)
        if project_id is not None:
            query = query.where(PairRow.project_id == project_id)
        with self.reading() as s:
            rows = s.execute(query)
            return [{"task_id": task, "annotator": annotator, "chosen_id": chosen, "rejected_id": rejected}
                    for task, annotator, chosen, rejected in rows]

    def pair_count(self, project_id: int | None = None, after_id: int = 0) -> int:
        """Pairs in the store (of one project), counting only those stored after pair `after_id`."""
        with self.reading() as s:
            query = select(func.count(PairRow.id)).where(PairRow.id > after_id)
            if project_id is not None:
                query = query.where(PairRow.project_id == project_id)
            return s.scalar(query) or 0

    def pair_times(self, project_id: int) -> list[tuple[datetime, int]]:
        """(stored at, annotation id) of each of the project's pairs, oldest first: its signal over time."""
        with self.reading() as s:
            rows = s.execute(select(PairRow.created_at, PairRow.annotation_id).where(PairRow.project_id == project_id)
                             .order_by(PairRow.id))
            return [(_aware(stamp), annotation) for stamp, annotation in rows]

    def max_pair_id(self, project_id: int) -> int:
        """A watermark: pairs stored later (new annotations or new versions of old ones) have larger ids."""
        with self.reading() as s:
            return s.scalar(select(func.max(PairRow.id)).where(PairRow.project_id == project_id)) or 0

    def last_pair_at(self, project_id: int) -> datetime | None:
        """When the project's newest pair was stored (None: it has none)."""
        with self.reading() as s:
            stamp = s.scalar(select(func.max(PairRow.created_at)).where(PairRow.project_id == project_id))
        return None if stamp is None else _aware(stamp)

    # --- model versions: one lineage of each kind per project ---
    def publish_version(self, kind: str, project_id: int, version: int, path: str, pairs_seen: int,
                        metrics: dict, serving: bool = True) -> int:
        """Make `path` the project's newest `kind` model; (project, kind, version) is unique, so two
        publishers cannot collide. `serving=False` records it without serving it (a policy the annotators
        have yet to promote: backend/promotion.py)."""
        with self.session() as s:
            s.add(ModelVersionRow(project_id=project_id, kind=kind, version=version, path=path,
                                  pairs_seen=pairs_seen, metrics=metrics, retired=not serving))
        return version

    def pending_promotion(self, project_id: int) -> ModelVersion | None:
        """The project's policy version that waits for the annotators' verdict, if any."""
        return next((v for v in reversed(self.versions("policy", project_id))
                     if v.metrics.get("promotion") == "pending"), None)

    def settle_promotion(self, project_id: int, version: int, promoted: bool, **verdict) -> None:
        """The annotators' verdict on a pending policy: it serves from now on, or it never will."""
        with self.session() as s:
            row = s.scalars(select(ModelVersionRow).where(_lineage("policy", project_id),
                                                          ModelVersionRow.version == version)).one()
            row.metrics = {**row.metrics, **verdict, "promotion": "promoted" if promoted else "refused"}
            row.retired = not promoted

    def rollback(self, kind: str, project_id: int, version: int) -> int:
        """Serve `version` again in the project by retiring every newer one; returns how many were retired."""
        with self.session() as s:
            target = s.scalars(select(ModelVersionRow).where(
                _lineage(kind, project_id), ModelVersionRow.version == version)).first()
            if target is None:
                known = sorted(s.scalars(select(ModelVersionRow.version).where(_lineage(kind, project_id))))
                raise ValueError(f"project {project_id} has no {kind} version {version}: its versions are {known}")
            target.retired = False
            newer = list(s.scalars(select(ModelVersionRow).where(_lineage(kind, project_id),
                                                                 ModelVersionRow.version > version)))
            for row in newer:  # a policy awaiting the annotators' verdict is withdrawn with the rest
                if row.metrics.get("promotion") == "pending":
                    row.metrics = {**row.metrics, "promotion": "withdrawn"}
            retired = [row for row in newer if not row.retired]
            for row in retired:
                row.retired = True
            return len(retired)

    def next_version(self, kind: str, project_id: int) -> int:
        with self.reading() as s:
            latest = s.scalar(select(func.max(ModelVersionRow.version)).where(_lineage(kind, project_id)))
            return 0 if latest is None else latest + 1

    def latest_version(self, kind: str, project_id: int) -> ModelVersion | None:
        with self.reading() as s:
            row = s.scalars(
                select(ModelVersionRow).where(_lineage(kind, project_id), ModelVersionRow.retired.is_(False))
                .order_by(ModelVersionRow.version.desc())
            ).first()
            return _version(row) if row else None

    def version(self, kind: str, project_id: int, version: int | None) -> ModelVersion | None:
        """One version of the project's lineage, retired or not; None if there is none by that number."""
        if version is None:
            return None
        with self.reading() as s:
            row = s.scalars(select(ModelVersionRow).where(_lineage(kind, project_id),
                                                          ModelVersionRow.version == version)).first()
            return _version(row) if row else None

    def versions(self, kind: str, project_id: int) -> list[ModelVersion]:
        with self.reading() as s:
            rows = s.scalars(select(ModelVersionRow).where(_lineage(kind, project_id))
                             .order_by(ModelVersionRow.version))
            return [_version(r) for r in rows]

    # --- jobs: rows here, their ids on the job queue ---
    def enqueue(self, kind: str, project_id: int | None, task_ids: Iterable[int] = (), **payload) -> int:
        """Queue a job, or fold it into the same kind's queued job for the project (a burst makes one job).

        For EXCLUSIVE_KINDS a job of the project that is already queued or running absorbs the request. The unique
        `active_key` makes this hold across processes: of two racing inserts, one fails and folds. A new job is
        announced on its lane's queue once it is committed.
        """
        key = f"{kind}:{project_id}"
        for _ in range(3):
            try:
                with self.session() as s:
                    active = s.scalars(select(JobRow).where(JobRow.active_key == key).with_for_update()).first()
                    if active is not None:
                        if active.state == "queued":
                            active.payload = _merge_payload(active.payload, task_ids, payload)
                        return active.id
                    job = JobRow(kind=kind, project_id=project_id, priority=JOB_PRIORITY.get(kind, 5),
                                 payload=_merge_payload({}, task_ids, payload), active_key=key)
                    s.add(job)
                    s.flush()
                    job_id = job.id
            except IntegrityError:  # another process queued the twin between our read and write
                continue
            self._announce([(job_id, kind)])
            return job_id
        raise RuntimeError(f"could not queue a {kind} job for project {project_id}: the store keeps conflicting")

    def _announce(self, jobs: Iterable[tuple[int, str]]) -> None:
        """Put committed queued jobs' ids on their lanes' queues. A queue that is down loses nothing:
        the job is in the store, and a worker announces it again (announce_lost_jobs)."""
        for job_id, kind in jobs:
            try:
                self.queue.announce(lane_of(kind), job_id, priority=-JOB_PRIORITY.get(kind, 5))
            except QueueUnavailable as exc:
                log.warning("%s; job %d stays queued in the store and is announced again later", exc, job_id)

    def announce_lost_jobs(self, lane: str, older_than: float = LOST_MESSAGE_SECONDS) -> int:
        """Announce again the queued jobs of `lane` whose message is gone: only while the lane's queue
        is empty, so a job that waits behind others is never announced twice. Returns how many."""
        announced = 0
        for queue_lane in _queue_lanes(lane):
            if self.queue.pending(queue_lane):
                continue
            before = _now() - timedelta(seconds=older_than)
            with self.reading() as s:
                lost = list(s.execute(select(JobRow.id, JobRow.kind).where(
                    JobRow.state == "queued", JobRow.kind.in_(sorted(LANES[queue_lane])),
                    JobRow.created_at < before).order_by(JobRow.id)))
            self._announce(lost)
            announced += len(lost)
        return announced

    def has_active_job(self, kind: str, project_id: int | None) -> bool:
        with self.reading() as s:
            query = select(func.count(JobRow.id)).where(JobRow.kind == kind, JobRow.project_id == project_id,
                                                        JobRow.state.in_(["queued", "running"]))
            return bool(s.scalar(query))

    def lane_busy(self, lane: str, host: str) -> bool:
        """Whether a job of `lane` waits, or runs on a worker of machine `host`."""
        with self.reading() as s:
            return bool(s.scalar(select(func.count(JobRow.id)).where(
                JobRow.kind.in_(sorted(LANES[lane])),
                or_(JobRow.state == "queued", (JobRow.state == "running") & JobRow.claimed_by.like(f"{host}:%")))))

    def claim_job(self, worker_id: str, lane: str = "all") -> Job | None:
        """The next job the queue of `lane` (LANES) hands this worker, moved to running in the store;
        None when the lane's queues are empty. A message of a job that is no longer queued (a duplicate,
        or a job its project's deletion stopped) is dropped."""
        for queue_lane in _queue_lanes(lane):
            while (job_id := self.queue.take(queue_lane)) is not None:
                job = self._claim(worker_id, job_id)
                if job is not None:
                    return job
        return None

    def _claim(self, worker_id: str, job_id: int) -> Job | None:
        """Move job `job_id` from queued to running for this worker, if it is still queued."""
        token = f"{worker_id}:{uuid.uuid4().hex[:8]}"
        with self.session() as s:
            claimed = s.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued")
                .values(state="running", claimed_by=token, started_at=_now(), heartbeat_at=_now(),
                        attempts=JobRow.attempts + 1)
            )
            if not claimed.rowcount:
                return None
            row = s.get(JobRow, job_id)
            if row.kind not in EXCLUSIVE_KINDS:  # a running job no longer absorbs new work: its twin may queue
                row.active_key = None
            return Job(id=row.id, kind=row.kind, project_id=row.project_id, payload=dict(row.payload))

    def finish_job(self, job_id: int, error: str | None = None) -> None:
        with self.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id).values(
                state="failed" if error else "done", error=error, finished_at=_now(), active_key=None))

    def release_jobs_of(self, worker_id: str, max_attempts: int | None) -> int:
        """The running jobs of a worker known to be gone go back to the queue now, not after their lease.
        max_attempts None: it was stopped on purpose (SIGTERM past its grace), the attempt is not spent;
        otherwise it died, and a job out of attempts fails with the reason. Returns how many."""
        with self.session() as s:
            rows = list(s.scalars(select(JobRow).where(JobRow.state == "running",
                                                       JobRow.claimed_by.like(f"{worker_id}:%")).with_for_update()))
            for row in rows:
                if max_attempts is None:
                    row.attempts -= 1
                _requeue_or_fail(row, max_attempts)
            requeued = [(row.id, row.kind) for row in rows if row.state == "queued"]
        self._announce(requeued)
        return len(rows)

    def beat(self, worker_id: str, job_id: int | None) -> None:
        """A worker is alive (and still runs `job_id`): renews its record and its job's lease."""
        with self.session() as s:
            row = s.get(WorkerRow, worker_id)
            if row is None:
                s.add(WorkerRow(id=worker_id, job_id=job_id))
            else:
                row.beat_at, row.job_id = _now(), job_id
            if job_id is not None:
                s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "running")
                          .values(heartbeat_at=_now()))

    def retire_worker(self, worker_id: str) -> None:
        """A worker that stops cleanly leaves no record that looks like a dead one."""
        with self.session() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))

    def live_workers(self, within_seconds: float) -> list[dict]:
        """Workers that beat within the last `within_seconds`."""
        since = _now() - timedelta(seconds=within_seconds)
        with self.reading() as s:
            rows = s.scalars(select(WorkerRow).where(WorkerRow.beat_at >= since).order_by(WorkerRow.id))
            return [{"id": r.id, "job": r.job_id, "beat_at": _aware(r.beat_at).isoformat()} for r in rows]

    def requeue_stale_jobs(self, lease_seconds: float, max_attempts: int) -> int:
        """Running jobs whose worker stopped beating go back to the queue, or fail once they used their
        attempts, with the reason. A job whose worker still beats is left alone, whoever asks."""
        stale_before = _now() - timedelta(seconds=lease_seconds)
        with self.session() as s:
            rows = list(s.scalars(select(JobRow).where(JobRow.state == "running",
                                                       JobRow.heartbeat_at < stale_before).with_for_update()))
            for row in rows:
                _requeue_or_fail(row, max_attempts)
            requeued = [(row.id, row.kind) for row in rows if row.state == "queued"]
        self._announce(requeued)
        return len(rows)

    def job_state(self, job_id: int) -> str | None:
        with self.reading() as s:
            return s.scalar(select(JobRow.state).where(JobRow.id == job_id))

    def job_counts(self) -> dict[str, int]:
        with self.reading() as s:
            rows = s.execute(select(JobRow.state, func.count(JobRow.id)).group_by(JobRow.state))
            return {state: n for state, n in rows}

    def jobs(self, limit: int = 20) -> list[dict]:
        with self.reading() as s:
            rows = s.scalars(select(JobRow).order_by(JobRow.id.desc()).limit(limit))
            return [{"id": r.id, "kind": r.kind, "project": r.project_id, "state": r.state, "error": r.error}
                    for r in rows]

    def job_durations(self, limit: int = 1000) -> dict[str, list[float]]:
        """Seconds from claim to finish of the newest `limit` done jobs, by kind."""
        with self.reading() as s:
            rows = s.execute(select(JobRow.kind, JobRow.started_at, JobRow.finished_at)
                             .where(JobRow.state == "done", JobRow.started_at.is_not(None))
                             .order_by(JobRow.id.desc()).limit(limit))
            durations: dict[str, list[float]] = {}
            for kind, started, finished in rows:
                durations.setdefault(kind, []).append((_aware(finished) - _aware(started)).total_seconds())
            return durations

    def active_jobs(self) -> list[dict]:
        """Queued and running jobs, most urgent first: what each lane has to do."""
        with self.reading() as s:
            rows = s.scalars(select(JobRow).where(JobRow.state.in_(["queued", "running"]))
                             .order_by(JobRow.priority, JobRow.id))
            return [{"id": r.id, "kind": r.kind, "project": r.project_id, "state": r.state, "attempts": r.attempts,
                     "started_at": _aware(r.started_at).isoformat() if r.started_at else None} for r in rows]

    # --- embeddings cache, shared by every process ---
    def get_embeddings(self, keys: list[str]) -> dict[str, bytes]:
        with self.reading() as s:
            rows = s.execute(select(EmbeddingRow.key, EmbeddingRow.vector).where(EmbeddingRow.key.in_(keys)))
            return {k: v for k, v in rows}

    def put_embeddings(self, vectors: dict[str, bytes]) -> None:
        """Cache vectors; a key another process cached meanwhile is kept (an upsert: two workers embedding
        the same texts at once made one of their reward fits fail on the unique key)."""
        if not vectors:
            return
        with self.session() as s:
            insert = postgresql_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
            s.execute(insert(EmbeddingRow).values([{"key": k, "vector": v} for k, v in vectors.items()])
                      .on_conflict_do_nothing(index_elements=["key"]))

    # --- events ---
    def log_event(self, kind: str, message: str, /, project: int | None = None, **data) -> None:
        """An event of one project's loop (`project`), or of the whole backend (None)."""
        if project is not None:
            data["project"] = project
        with self.session() as s:
            s.add(EventRow(kind=kind, message=message, project_id=project,
                           data=json.loads(json.dumps(data, default=str))))

    def last_event_data(self, kind: str, project_id: int) -> dict | None:
        """The data of the project's newest event of `kind`, or None if there is none."""
        with self.reading() as s:
            return s.scalar(select(EventRow.data).where(EventRow.kind == kind, EventRow.project_id == project_id)
                            .order_by(EventRow.id.desc()).limit(1))

    def events_of(self, project_id: int, kinds: Iterable[str], limit: int) -> list[dict]:
        """The project's newest `limit` events of `kinds`, oldest first (a policy update's steps, say)."""
        with self.reading() as s:
            rows = list(s.scalars(select(EventRow).where(EventRow.project_id == project_id,
                                                         EventRow.kind.in_(list(kinds)))
                                  .order_by(EventRow.id.desc()).limit(limit)))[::-1]
            return [{"id": r.id, "kind": r.kind, "message": r.message, "data": r.data,
                     "at": _aware(r.created_at).isoformat()} for r in rows]

    def events(self, after_id: int = 0, limit: int = 100, project_id: int | None = None) -> list[dict]:
        """The `limit` events after `after_id`, oldest first; with no cursor, the newest `limit`.
        With `project_id`: that project's events and the backend's own."""
        with self.reading() as s:
            query = select(EventRow)
            if project_id is not None:
                query = query.where(or_(EventRow.project_id == project_id, EventRow.project_id.is_(None)))
            if after_id:
                rows = list(s.scalars(query.where(EventRow.id > after_id).order_by(EventRow.id).limit(limit)))
            else:
                rows = list(s.scalars(query.order_by(EventRow.id.desc()).limit(limit)))[::-1]
            return [{"id": r.id, "kind": r.kind, "project": r.project_id, "message": r.message, "data": r.data,
                     "at": r.created_at.isoformat()} for r in rows]


@contextmanager
def _named_lock(engine: Engine, name: str, key: int) -> Iterator[None]:
    """A lock across processes: a file lock beside a SQLite database, a session-level advisory lock
    (`key`) on PostgreSQL, so across machines too."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.{name}-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _locked_annotation(s: Session, annotation_id: int) -> tuple[AnnotationRow, bool]:
    """The annotation's row, locked for this transaction; created (True) if it did not exist.

    An upsert, not read-then-write: two events for a new annotation on PostgreSQL would both read
    nothing and both insert (one failing); here the second waits on the first's row lock, then reads
    what it wrote. SQLite's writers are serialised by BEGIN IMMEDIATE already."""
    insert = postgresql_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    created = s.execute(insert(AnnotationRow).values(id=annotation_id, fingerprint="", deleted=False)
                        .on_conflict_do_nothing(index_elements=["id"]).returning(AnnotationRow.id)).first() is not None
    row = s.scalars(select(AnnotationRow).where(AnnotationRow.id == annotation_id).with_for_update()
                    .execution_options(populate_existing=True)).one()
    return row, created


def _tombstone(s: Session, annotation_ids: Iterable[int], project_id: int | None) -> None:
    """Deleted annotations: their pairs go, and a tombstone (keeping nothing of the version it replaces,
    so delete-then-save and save-then-delete end alike) stops a late save reviving them."""
    ids = sorted(set(annotation_ids))  # one lock order, so two deletes of overlapping ids cannot deadlock
    for annotation_id in ids:
        row, _ = _locked_annotation(s, annotation_id)
        row.project_id, row.task_id, row.updated_at = project_id, None, None
        row.fingerprint, row.deleted, row.refused = "", True, None
    s.execute(delete(PairRow).where(PairRow.annotation_id.in_(ids)))


def _by_project(rows) -> dict[int, list[int]]:
    """(project id, task id) rows -> task ids by project."""
    grouped: dict[int, list[int]] = {}
    for project_id, task_id in rows:
        grouped.setdefault(project_id, []).append(task_id)
    return grouped


def _requeue_or_fail(row: JobRow, max_attempts: int | None) -> None:
    """A running job whose worker is gone: back in the queue, or failed once it used its attempts."""
    if max_attempts is not None and row.attempts >= max_attempts:
        row.state, row.finished_at, row.active_key = "failed", _now(), None
        row.error = (f"its worker stopped (killed or lost) during each of {row.attempts} attempts; "
                     f"the last was {row.claimed_by}")
    else:  # an exclusive kind's job kept its key while it ran, so it still absorbs twins
        row.state, row.claimed_by, row.heartbeat_at = "queued", None, None


def _queue_lanes(lane: str) -> tuple[str, ...]:
    if lane not in LANES:
        raise ValueError(f"lane {lane!r} is not one of {sorted(LANES)}: pass --lane fast, train or all")
    return QUEUE_LANES if lane == "all" else (lane,)


def _merge_payload(old: dict, task_ids: Iterable[int], extra: dict) -> dict:
    merged = {**old, **extra}
    merged["task_ids"] = sorted(set(old.get("task_ids", [])) | set(task_ids))
    return merged


def _aware(stamp: datetime) -> datetime:
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp  # SQLite keeps no time zone


def _annotation_record(row: AnnotationRow | None) -> ledger.AnnotationRecord | None:
    if row is None:
        return None
    stamp = row.updated_at
    if stamp is not None and stamp.tzinfo is None:  # SQLite keeps no time zone; the ledger's stamps are UTC
        stamp = stamp.replace(tzinfo=UTC)
    return ledger.AnnotationRecord(row.id, row.project_id, row.task_id, stamp, row.fingerprint, row.deleted,
                                   refused=row.refused)


def _lineage(kind: str, project_id: int):
    """The project's versions of `kind`, and those published before projects had their own (NULL)."""
    return (ModelVersionRow.kind == kind) & or_(ModelVersionRow.project_id == project_id,
                                                ModelVersionRow.project_id.is_(None))


def _version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(kind=row.kind, version=row.version, path=row.path, pairs_seen=row.pairs_seen,
                        metrics=dict(row.metrics or {}), retired=bool(row.retired), project_id=row.project_id)


def text_key(namespace: str, text: str) -> str:
    return hashlib.sha256(f"{namespace}\0{text}".encode()).hexdigest()
