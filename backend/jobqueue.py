"""The job queue's transport: a queued job's id in, that id out at one worker of its lane.

The store decides what must happen: a job's row holds its kind, project, payload, state, attempts and lease
(store.py). This module only carries each queued job's id to a worker, on one of huey's storages:
- Redis (`REDIS_URL` set): workers on other machines take jobs from it;
- otherwise where the store lives: a SQLite file beside a SQLite store (embedded, no server: the
  default), or the store's own PostgreSQL database (LISTEN/NOTIFY tables of huey's).
Each lane has its own queue, so a policy update of minutes never holds up candidates or reward updates.

huey removes a message when a worker takes it, so a worker killed between taking and finishing loses it
(coleifer/huey issues 571, 559, 844). Here a message is only a wake-up: the worker claims the job in the
store by id (a conditional UPDATE, so a duplicate message runs nothing twice), leases keep it, and any
worker announces again a queued job whose message was lost (docs/queue.md). Messages are JSON job ids,
never pickles: a reachable Redis must not be a way to run code in the workers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huey.storage import BaseStorage, MemoryStorage, PostgresStorage, PriorityRedisStorage, SqliteStorage
from redis import ConnectionPool
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

# a webhook's wait for an unreachable Redis (connect) and for an answer from a busy one (each call)
REDIS_CONNECT_SECONDS, REDIS_CALL_SECONDS = 0.5, 1.0
QUEUE_LANES = ("fast", "train")  # the lanes with a queue of their own; lane "all" takes from both, fast first


class QueueUnavailable(RuntimeError):
    """The queue's server cannot be reached; the store still holds every job, so nothing is lost."""


class JobQueue:
    """One huey storage per lane. Cheap to build: nothing connects before the first message."""

    def __init__(self, store_url: str, redis_url: str = ""):
        self.backend, self._storage = _backend(store_url, redis_url)
        self._lanes: dict[str, BaseStorage] = {}

    def lane(self, lane: str) -> BaseStorage:
        if lane not in QUEUE_LANES:
            raise ValueError(f"lane {lane!r} has no queue: use one of {QUEUE_LANES}")
        if lane not in self._lanes:
            self._lanes[lane] = self._storage(f"rlhf_{lane}")
        return self._lanes[lane]

    def announce(self, lane: str, job_id: int, priority: int) -> None:
        """Tell the lane's workers that job `job_id` waits; higher `priority` is taken first."""
        try:
            self.lane(lane).enqueue(json.dumps({"job": job_id}).encode(), priority)
        except Exception as exc:
            raise QueueUnavailable(f"could not announce job {job_id} on the {self.backend} queue: {exc}") from exc

    def take(self, lane: str) -> int | None:
        """The id of the next announced job of `lane`, or None when its queue is empty."""
        try:
            data = self.lane(lane).dequeue()
        except Exception as exc:
            raise QueueUnavailable(f"could not read the {self.backend} queue of lane {lane}: {exc}") from exc
        if data is None:
            return None
        try:
            return int(json.loads(data)["job"])
        except (ValueError, KeyError, TypeError):
            log.warning("dropped a message on lane %s that is not a job id: %r", lane, bytes(data)[:80])
            return self.take(lane)

    def pending(self, lane: str) -> int:
        """Messages waiting on the lane's queue."""
        try:
            return self.lane(lane).queue_size()
        except Exception as exc:
            raise QueueUnavailable(f"could not read the {self.backend} queue of lane {lane}: {exc}") from exc

    def close(self) -> None:
        for storage in self._lanes.values():
            if hasattr(storage, "close"):
                storage.close()
        self._lanes.clear()


def _backend(store_url: str, redis_url: str):
    """("redis" | "sqlite" | "postgresql" | "memory", a factory of one lane's storage by queue name)."""
    if redis_url:  # validated by the settings
        # a webhook that queues a job is answered within Label Studio's 1 s even when Redis is unreachable
        # (its job is kept in the store); non-blocking pops: a worker of lane "all" polls two queues
        pool = ConnectionPool.from_url(redis_url, socket_connect_timeout=REDIS_CONNECT_SECONDS,
                                       socket_timeout=REDIS_CALL_SECONDS)
        return "redis", lambda name: PriorityRedisStorage(name=name, connection_pool=pool, blocking=False)
    url = make_url(store_url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":  # one process's store: one process's queue
            return "memory", lambda name: MemoryStorage(name=name)
        # a file of its own: the queue's writes never wait for the store's write lock, nor it for theirs
        path = Path(url.database)
        queue_file = str(path.with_name(path.stem + ".queue" + path.suffix))
        return "sqlite", lambda name: SqliteStorage(name=name, filename=queue_file)
    if url.get_backend_name() == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return "postgresql", lambda name: PostgresStorage(name=name, dsn=dsn, blocking=False, table_prefix="rlhf_queue")
    raise ValueError(f"DATABASE_URL={store_url!r}: the job queue supports SQLite and PostgreSQL stores, "
                     "or set REDIS_URL")
