from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_encoder, build_tiny_policy  # noqa: E402

from backend.local_servers import TOKEN, migrated_label_studio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAYLOADS = ROOT.parent / "shared" / "label-studio" / "payloads"
HH_PAIRS = ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the RL tests train: RLHF_TEST_DEVICE (cpu by default; cuda on a GPU machine)."""
    return torch.device(os.environ.get("RLHF_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture
def tiny_env(tmp_path, tiny_policy, tiny_encoder) -> dict[str, str]:
    """Settings environment of a backend on the tiny models, with all state under tmp_path."""
    return {
        "MODEL_DIR": str(tmp_path / "model_dir"),
        "POLICY_MODEL": str(tiny_policy),
        "REWARD_MODEL": str(tiny_encoder),
        "NUM_CANDIDATES": "3",
        "MAX_NEW_TOKENS": "8",
        "PPO_TRIGGER_PAIRS": "6",
        # tests rank and train within a second: the pause a real burst of rankings gets has a test of its own
        "PPO_TRIGGER_QUIET_SECONDS": "0",
        "PPO_STEPS": "2",
        "PPO_BATCH_SIZE": "2",
        # a random tiny reward model is no judge: the guard rails have tests of their own (test_worker.py)
        "PPO_MIN_RM_ACCURACY": "0",
        "PPO_MIN_REWARD_GAIN": "-1000",
        "PPO_MAX_KL": "1000",
        "PPO_MAX_NLL_RISE": "1000",
        "TORCH_THREADS": "1",
    }


@pytest.fixture
def store(tmp_path):
    """An empty store in a fresh SQLite file."""
    from backend.store import Store

    store = Store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    store.create_schema()
    return store


@pytest.fixture
def encoder(tiny_encoder, store):
    """The tiny encoder, caching its embeddings in `store`."""
    from backend.models import load_encoder
    from backend.reward import TextEncoder

    model, tokenizer = load_encoder(str(tiny_encoder))
    return TextEncoder(model, tokenizer, name="tiny", store=store)


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster for the session (PostgreSQL 15 is on the machine image)."""
    import tempfile

    from backend.local_servers import start_postgres

    url, stop = start_postgres(Path(tempfile.mkdtemp(prefix="rlhf-pg-")) / "data")
    yield url
    stop()


@pytest.fixture(scope="session")
def redis_server():
    """A throwaway Redis server for the session (Debian's redis-server, from make debian-tools)."""
    import tempfile

    from backend.local_servers import start_redis

    url, stop = start_redis(Path(tempfile.mkdtemp(prefix="rlhf-redis-")))
    yield url
    stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied and its command counts reset: each test sees only its own queues."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.config_resetstat()
    return redis_server


@pytest.fixture
def postgres_database(postgres_server, request) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    import re

    from sqlalchemy import create_engine

    name = "t_" + re.sub(r"\W", "_", request.node.name.lower())[-50:]
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return postgres_server.rsplit("/", 1)[0] + f"/{name}"


def payload(name: str) -> dict:
    """The body of a request Label Studio 1.23 really sent (shared/label-studio/payloads)."""
    return json.loads((PAYLOADS / f"{name}.json").read_text())["body"]


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    server = migrated_label_studio(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=TOKEN)
