import pytest

from backend.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """An empty database of each kind the store supports: SQLite (default) and PostgreSQL (DATABASE_URL)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    return request.getfixturevalue("postgres_database")


@pytest.fixture
def store(store_url) -> Store:
    store = Store(store_url)
    store.create_schema()
    return store


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def job_store(request, tmp_path) -> Store:
    """An empty store on each job queue: SQLite's file beside it (default), PostgreSQL's tables in its
    database, and a real Redis server (REDIS_URL) beside a SQLite store."""
    if request.param == "postgresql":
        store = Store(request.getfixturevalue("postgres_database"))
    else:
        redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else ""
        store = Store(f"sqlite:///{tmp_path / 'store.sqlite3'}", redis_url)
    store.create_schema()
    return store


def test_a_burst_of_jobs_of_one_kind_folds_into_one_queued_job(job_store):
    ids = {job_store.enqueue("generate", 1, task_ids=[i]) for i in range(5)}
    assert len(ids) == 1
    job = job_store.claim_job("w")
    assert job.payload["task_ids"] == [0, 1, 2, 3, 4]
    assert job_store.claim_job("w") is None


def test_jobs_are_claimed_most_urgent_first_and_only_once(job_store):
    job_store.enqueue("train_policy", None)
    job_store.enqueue("generate", 1, task_ids=[1])
    job_store.enqueue("fit_reward", None)
    kinds = [job_store.claim_job(f"w{i}").kind for i in range(3)]
    assert kinds == ["fit_reward", "generate", "train_policy"]
    assert job_store.claim_job("w9") is None


def test_a_job_queued_while_another_runs_is_a_new_job(job_store):
    first = job_store.enqueue("fit_reward", None)
    job_store.claim_job("w")
    assert job_store.enqueue("fit_reward", None) != first


def test_a_job_whose_worker_stopped_beating_is_requeued_and_a_beating_ones_is_not(job_store):
    import time

    job_store.enqueue("fit_reward", None)
    job_store.enqueue("generate", 1, task_ids=[1])
    dead, alive = job_store.claim_job("dead-worker"), job_store.claim_job("live-worker")
    time.sleep(1.5)
    job_store.beat("live-worker", alive.id)
    assert job_store.requeue_stale_jobs(lease_seconds=1.0, max_attempts=3) == 1
    assert job_store.job_state(dead.id) == "queued" and job_store.job_state(alive.id) == "running"
    assert job_store.claim_job("new-worker").id == dead.id


def test_a_job_that_loses_its_worker_on_every_attempt_fails_with_the_reason(job_store):
    import time

    job_id = job_store.enqueue("train_policy", None)
    for attempt in range(3):
        assert job_store.claim_job(f"worker-{attempt}").id == job_id
        time.sleep(0.05)
        job_store.requeue_stale_jobs(lease_seconds=0.01, max_attempts=3)
    assert job_store.job_state(job_id) == "failed"
    assert "each of 3 attempts" in job_store.jobs()[0]["error"] and "worker-2" in job_store.jobs()[0]["error"]
    assert job_store.enqueue("train_policy", None) != job_id  # its key is free again


def test_a_requeued_policy_update_still_absorbs_a_new_trigger(job_store):
    import time

    job_id = job_store.enqueue("train_policy", 4)
    job_store.claim_job("dead-worker")
    time.sleep(0.05)
    job_store.requeue_stale_jobs(lease_seconds=0.01, max_attempts=3)
    assert job_store.enqueue("train_policy", 4) == job_id


def test_a_worker_stopped_on_purpose_releases_its_job_without_spending_an_attempt(job_store):
    job_id = job_store.enqueue("fit_reward", None)
    job_store.claim_job("host:41")
    job_store.claim_job("host:4")  # nothing left: another worker's name must not match host:41's jobs
    assert job_store.release_jobs_of("host:4", None) == 0 and job_store.release_jobs_of("host:41", None) == 1
    assert job_store.job_state(job_id) == "queued"
    for attempt in range(3):  # three crashes: the third fails it, the SIGTERM above did not count
        job_store.claim_job(f"host:5{attempt}")
        assert job_store.release_jobs_of(f"host:5{attempt}", max_attempts=3) == 1
    assert job_store.job_state(job_id) == "failed" and "3 attempts" in job_store.jobs()[0]["error"]


def test_live_workers_are_those_that_beat_recently(store):
    import time

    store.beat("old", None)
    time.sleep(1.5)
    store.beat("new", 7)
    assert [w["id"] for w in store.live_workers(within_seconds=1.0)] == ["new"]
    assert store.live_workers(within_seconds=1.0)[0]["job"] == 7
    store.retire_worker("new")
    assert store.live_workers(within_seconds=60) == [{"id": "old", "job": None,
                                                      "beat_at": store.live_workers(60)[0]["beat_at"]}]


def test_failed_job_keeps_its_reason(job_store):
    job_store.enqueue("fit_reward", None)
    job = job_store.claim_job("w")
    job_store.finish_job(job.id, error="ValueError: boom")
    assert job_store.jobs()[0]["error"] == "ValueError: boom" and job_store.job_counts() == {"failed": 1}


def test_next_version_counts_up_per_kind_and_project(store):
    store.publish_version("policy", 1, 0, "/p0", 0, {})
    assert store.next_version("policy", 1) == 1 and store.next_version("reward", 1) == 0
    store.publish_version("policy", 1, 1, "/p1", 6, {})
    assert store.latest_version("policy", 1).path == "/p1" and store.latest_version("policy", 1).pairs_seen == 6
    assert store.next_version("policy", 2) == 0 and store.latest_version("policy", 2) is None


def test_two_projects_keep_their_own_lineages(store):
    store.publish_version("reward", 1, 1, "/a/r1", 3, {})
    store.publish_version("reward", 2, 1, "/b/r1", 5, {})  # the same number in another project
    store.publish_version("reward", 1, 2, "/a/r2", 4, {})
    assert store.latest_version("reward", 1).path == "/a/r2" and store.latest_version("reward", 2).path == "/b/r1"
    assert store.rollback("reward", 1, 1) == 1
    assert store.latest_version("reward", 2).path == "/b/r1" and not store.versions("reward", 2)[0].retired


def test_publishing_the_same_version_twice_fails_loudly(store):
    store.publish_version("reward", 1, 1, "/r1", 3, {})
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        store.publish_version("reward", 1, 1, "/other", 3, {})


def _saved(annotation_id: int, stamp: str, n_pairs: int = 1):
    from backend.ledger import AnnotationSaved, parse_time
    from backend.preferences import PreferencePair

    pair = PreferencePair(project_id=1, task_id=2, annotator=3, prompt="p", chosen=stamp, rejected="b", margin=0.0,
                          chosen_policy_version=0, rejected_policy_version=0, chosen_id="c0", rejected_id="c1")
    return AnnotationSaved(annotation_id, 1, 2, parse_time(stamp), (pair,) * n_pairs)


def test_a_repeated_save_keeps_one_copy_and_an_older_one_is_ignored(store):
    assert store.apply_annotation_event(_saved(10, "2026-01-02T00:00:00Z", 2))
    assert not store.apply_annotation_event(_saved(10, "2026-01-02T00:00:00Z", 2))
    assert not store.apply_annotation_event(_saved(10, "2026-01-01T00:00:00Z"))
    assert store.pair_count() == 2 and store.pairs()[0].chosen == "2026-01-02T00:00:00Z"
    assert store.pairs()[0].chosen_id == "c0" and store.pairs()[0].annotation_id == 10


def test_a_deleted_annotation_is_not_revived_by_a_late_save(store):
    from backend.ledger import AnnotationsDeleted

    store.apply_annotation_event(_saved(10, "2026-01-01T00:00:00Z"))
    store.apply_annotation_event(AnnotationsDeleted((10,), 1))
    assert not store.apply_annotation_event(_saved(10, "2026-02-01T00:00:00Z"))
    assert store.pair_count() == 0 and store.annotation_ids(1) == set()


def test_only_one_policy_update_per_project_is_queued_or_running_at_a_time(store):
    first = store.enqueue("train_policy", 7)
    assert store.enqueue("train_policy", 7) == first
    store.claim_job("w")
    assert store.enqueue("train_policy", 7) == first  # the running run absorbs the trigger
    other = store.enqueue("train_policy", 8)
    assert other != first and store.has_active_job("train_policy", 8)  # another project's loop is its own
    store.finish_job(first)
    assert store.enqueue("train_policy", 7) not in (first, other)


def test_twin_jobs_queued_from_two_processes_fold_into_one(store_url):
    import multiprocessing

    url = store_url
    Store(url).create_schema()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.starmap(_enqueue_in_another_process, [(url, i) for i in range(16)])
    assert len(set(ids)) == 1
    job = Store(url).claim_job("w")
    assert job.payload["task_ids"] == list(range(16))


def _enqueue_in_another_process(url: str, task_id: int) -> int:
    return Store(url).enqueue("generate", 1, task_ids=[task_id])


def test_processes_starting_together_on_an_empty_database_migrate_it_once(store_url):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        counts = pool.map(_migrate_in_another_process, [store_url] * 4)
    assert counts == [0, 0, 0, 0]  # every process got a working schema; none failed creating a table twice


def _migrate_in_another_process(url: str) -> int:
    store = Store(url)
    store.create_schema()
    return store.pair_count()


def test_schema_migrations_are_safe_to_run_twice(store_url):
    url = store_url
    Store(url).create_schema()
    Store(url).create_schema()
    assert Store(url).pair_count() == 0


def test_rollback_serves_the_older_version_and_numbering_continues(store):
    for v in range(3):
        store.publish_version("policy", 1, v, f"/p{v}", v, {})
    assert store.rollback("policy", 1, 1) == 1
    assert store.latest_version("policy", 1).version == 1
    assert store.next_version("policy", 1) == 3  # v2 stays on record, retired
    assert [v.retired for v in store.versions("policy", 1)] == [False, False, True]


def test_a_version_is_found_by_its_number_retired_or_not_and_none_when_unknown(store):
    for v in range(3):
        store.publish_version("reward", 1, v, f"/r{v}", v, {"held_out_accuracy": v / 10})
    store.rollback("reward", 1, 0)
    assert store.version("reward", 1, 2).path == "/r2" and store.version("reward", 1, 2).retired
    assert store.version("reward", 1, 1).metrics == {"held_out_accuracy": 0.1}
    assert store.version("reward", 1, 7) is None and store.version("reward", 2, 1) is None
    assert store.version("reward", 1, None) is None


def test_rollback_to_an_unknown_version_names_the_known_ones(store):
    store.publish_version("reward", 1, 1, "/r1", 3, {})
    with pytest.raises(ValueError, match=r"project 1 has no reward version 7: its versions are \[1\]"):
        store.rollback("reward", 1, 7)


def test_a_database_of_the_first_schema_is_migrated_in_place(store_url):
    from alembic import command
    from alembic.config import Config

    from backend.store import MIGRATIONS

    url = store_url
    old = Store(url)
    with old.engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.exec_driver_sql("INSERT INTO model_versions (kind, version, path, pairs_seen, metrics, created_at) "
                                   "VALUES ('policy', 0, '/base', 0, '{}', '2026-01-01')")
    Store(url).create_schema()
    upgraded = Store(url)
    # versions from before projects had their own loops are every project's common ancestry
    assert upgraded.latest_version("policy", 1).path == "/base" and upgraded.latest_version("policy", 2).path == "/base"
    assert upgraded.next_version("policy", 1) == 1
    upgraded.publish_version("policy", 1, 1, "/mine", 0, {})
    assert upgraded.latest_version("policy", 1).path == "/mine" and upgraded.latest_version("policy", 2).path == "/base"


def test_pair_orders_name_candidates_by_id_or_else_by_text_for_agreement(store):
    from backend.agreement import pairwise_agreement
    from backend.ledger import AnnotationSaved, parse_time
    from backend.preferences import PreferencePair

    def saved(annotation_id: int, annotator: int, chosen: str, ids: bool) -> AnnotationSaved:
        pair = PreferencePair(project_id=1, task_id=2, annotator=annotator, prompt="p", chosen=chosen,
                              rejected="x" if chosen == "y" else "y", margin=0.0, chosen_policy_version=0,
                              rejected_policy_version=0, chosen_id=f"id-{chosen}" if ids else None,
                              rejected_id=("id-x" if chosen == "y" else "id-y") if ids else None)
        return AnnotationSaved(annotation_id, 1, 2, parse_time("2026-01-01T00:00:00Z"), (pair,))

    for annotation_id, annotator, chosen, ids in ((1, 1, "x", True), (2, 2, "x", True), (3, 3, "y", False)):
        store.apply_annotation_event(saved(annotation_id, annotator, chosen, ids))
    orders = store.pair_orders()
    assert [(o["annotator"], o["chosen_id"], o["rejected_id"]) for o in orders] == [
        (1, "id-x", "id-y"), (2, "id-x", "id-y"), (3, "y", "x")]
    assert pairwise_agreement(orders) == pairwise_agreement(store.pairs())


def test_a_deleted_task_takes_its_pairs_out_of_training_and_a_late_save_stays_out(store):
    store.save_task(1, 2, {"prompt": "p"})
    store.save_task(1, 3, {"prompt": "q"})
    store.apply_annotation_event(_saved(10, "2026-01-01T00:00:00Z", 2))  # on task 2
    assert store.delete_tasks([2, 99]) == {1: [2]}
    assert store.pair_count() == 0 and store.task_ids(1) == {3}
    assert not store.apply_annotation_event(_saved(10, "2026-02-01T00:00:00Z"))  # tombstoned, not revived
    assert store.pair_count() == 0


def test_a_deleted_project_stops_its_queued_jobs_and_keeps_its_pairs(store):
    store.save_project(1, "<View/>")
    store.save_project(2, "<View/>")
    store.apply_annotation_event(_saved(10, "2026-01-01T00:00:00Z"))
    mine, other = store.enqueue("generate", 1, task_ids=[5]), store.enqueue("generate", 2, task_ids=[6])
    assert store.delete_project(1) == 1
    assert store.job_state(mine) == "failed" and store.job_state(other) == "queued"
    assert store.project_ids() == [2] and store.project_deleted(1) and not store.project_deleted(2)
    assert store.pair_count(project_id=1) == 1  # still exportable


def test_a_lane_claims_only_its_kinds_of_job(job_store):
    update = job_store.enqueue("train_policy", None)  # queued first, but not the fast lane's
    generate = job_store.enqueue("generate", 1, task_ids=[1])
    assert job_store.claim_job("fast", "fast").id == generate
    assert job_store.claim_job("fast", "fast") is None
    assert job_store.claim_job("train", "train").id == update


def test_a_duplicate_message_runs_its_job_once(job_store):
    job_id = job_store.enqueue("fit_reward", 1)
    job_store.queue.announce("fast", job_id, priority=0)  # as a second announcement of a lost message does
    assert job_store.claim_job("w1").id == job_id
    assert job_store.claim_job("w2") is None and job_store.queue.pending("fast") == 0


def test_a_queued_job_whose_message_was_lost_is_announced_again_once_the_queue_is_empty(job_store):
    import time

    lost = job_store.enqueue("generate", 1, task_ids=[1])
    assert job_store.queue.take("fast") == lost  # a worker took the message and died before claiming the job
    waiting = job_store.enqueue("train_policy", 1)  # its message is on the train queue: not announced twice
    assert job_store.announce_lost_jobs("all", older_than=60) == 0  # too young: its message may be in flight
    time.sleep(0.05)
    assert job_store.announce_lost_jobs("all", older_than=0.01) == 1
    assert job_store.claim_job("w", "fast").id == lost
    assert job_store.claim_job("w", "train").id == waiting and job_store.claim_job("w") is None


def test_a_job_queued_while_the_queue_is_down_is_kept_and_announced_when_it_is_back(tmp_path, redis_url):
    import time

    from backend.jobqueue import QueueUnavailable
    from backend.local_servers import free_port

    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    down = Store(url, f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    down.create_schema()
    job_id = down.enqueue("fit_reward", 3)  # what a webhook does: it must still be answered
    with pytest.raises(QueueUnavailable, match="could not read the redis queue of lane fast"):
        down.claim_job("w")
    up = Store(url, redis_url)
    time.sleep(0.05)
    assert up.claim_job("w") is None and up.announce_lost_jobs("fast", older_than=0.01) == 1
    assert up.claim_job("w").id == job_id


def test_queue_messages_are_json_job_ids_and_anything_else_is_dropped(job_store):
    job_id = job_store.enqueue("fit_reward", 1)
    job_store.queue.lane("fast").enqueue(b"\x80\x04pickled", 5)  # taken first: a higher priority
    assert job_store.claim_job("w").id == job_id


def test_reads_do_not_wait_for_a_writer_holding_the_lock(store_url):
    import threading

    writer, reader = Store(store_url), Store(store_url)
    writer.create_schema()
    writer.publish_version("reward", 1, 1, "/r1", 3, {})
    answers = []
    with writer.session() as s:  # a long write transaction holds the write lock...
        s.add(a_pair_row(project_id=1))
        s.flush()
        thread = threading.Thread(target=lambda: answers.append((reader.latest_version("reward", 1).path,
                                                                 reader.pair_count(1))))
        thread.start()
        thread.join(timeout=5)  # ...well under SQLite's 10 s busy timeout, which a locked read would wait out
        assert not thread.is_alive() and answers == [("/r1", 0)]  # the snapshot before the write
    assert reader.pair_count(1) == 1


def a_pair_row(project_id: int):
    from backend.store import PairRow

    return PairRow(project_id=project_id, task_id=1, annotation_id=1, prompt="p", chosen="a", rejected="b")


def test_concurrent_versions_of_one_new_annotation_end_in_the_newest(store_url):
    import threading

    Store(store_url).create_schema()
    stamps = [f"2026-01-0{day}T00:00:00Z" for day in range(1, 9)]
    errors = []

    def save(stamp: str) -> None:
        try:
            Store(store_url).apply_annotation_event(_saved(77, stamp, n_pairs=2))
        except Exception as exc:  # a lost race would surface here as an IntegrityError
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(stamp,)) for stamp in reversed(stamps)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store = Store(store_url)
    assert errors == []
    assert store.annotation_records()[77].updated_at.isoformat().startswith("2026-01-08")
    assert store.pair_count() == 2  # one version's pairs, not two versions' mixed


def test_two_workers_caching_the_same_embeddings_at_once_both_succeed(store_url):
    """Two workers fitting reward models on the same texts: the second insert of a key is kept, not a failure."""
    import threading

    stores = [Store(store_url), Store(store_url)]
    stores[0].create_schema()
    errors = []

    def put(store: Store, barrier: threading.Barrier, vectors: dict) -> None:
        barrier.wait()
        try:
            store.put_embeddings(vectors)
        except Exception as exc:  # the race the upsert closes: both read no key, both insert it
            errors.append(exc)

    for round_ in range(40):  # the window is narrow: many rounds of fresh keys
        vectors = {f"key{round_}-{i}": bytes([i]) * 4 for i in range(20)}
        barrier = threading.Barrier(2)
        threads = [threading.Thread(target=put, args=(s, barrier, vectors)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert stores[1].get_embeddings(["key39-7"]) == {"key39-7": bytes([7]) * 4}
