"""Local servers for the demo and the end-to-end tests: settings in, running processes out.

A real Label Studio from its own virtualenv (.venv-labelstudio), the backend under gunicorn, and
throwaway PostgreSQL and Redis servers from Debian's packages.

Label Studio migrates its SQLite database on the first start of a data dir (about 60 s here),
so a migrated data dir is kept under .cache/ and copied for each test session (about 5 s to start).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
LABEL_STUDIO_BIN = ROOT / ".venv-labelstudio" / "bin" / "label-studio"
TEMPLATE_DIR = ROOT / ".cache" / "label-studio-data"
USERNAME = "admin@example.com"
PASSWORD = "rlhf-admin-pass"
TOKEN = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, as Label Studio requires


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Poll `condition` until it returns something truthy (returned), or raise naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s; log:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop(self.process)


def label_studio_env(data_dir: Path) -> dict:
    return {
        **os.environ,
        "DJANGO_DB": "sqlite",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": USERNAME,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
    }


def start_label_studio(data_dir: Path, port: int | None = None, timeout: float = 240) -> Server:
    """A Label Studio on 127.0.0.1 whose admin and API token exist from the start."""
    if not LABEL_STUDIO_BIN.exists():
        raise FileNotFoundError(f"{LABEL_STUDIO_BIN} is missing: run `make install`")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [str(LABEL_STUDIO_BIN), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir)]
    return _launch(command, port, data_dir / "label-studio.log", timeout, env=label_studio_env(data_dir), cwd=data_dir)


def migrated_label_studio(data_dir: Path, port: int | None = None) -> Server:
    """Start Label Studio on a copy of the migrated template data dir (making the template once)."""
    if not (TEMPLATE_DIR / "label_studio.sqlite3").exists():
        staging = TEMPLATE_DIR.with_name(TEMPLATE_DIR.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        start_label_studio(staging).stop()
        shutil.rmtree(TEMPLATE_DIR, ignore_errors=True)
        staging.rename(TEMPLATE_DIR)
    shutil.copytree(TEMPLATE_DIR, data_dir, ignore=shutil.ignore_patterns("*.log", "export", "media"), dirs_exist_ok=True)
    return start_label_studio(data_dir, port)


def start_backend(env: dict, port: int | None = None, log: Path | None = None, timeout: float = 120) -> Server:
    """`rlhf-backend serve` (gunicorn + training worker) with the given settings environment."""
    port = port or free_port()
    log = log or Path(env["MODEL_DIR"]) / "backend.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "backend.cli", "serve", "--port", str(port), "--workers", "2"]
    # its own session: one killpg reaches gunicorn, its web workers and the training worker
    return _launch(command, port, log, timeout, env={**os.environ, **env}, cwd=ROOT, start_new_session=True)


def _launch(command: list[str], port: int, log: Path, timeout: float, **popen) -> Server:
    """Start `command`, logging to `log`, and wait until it answers GET /health on `port`."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", process, timeout, log)
    except Exception:
        stop(process)
        raise
    return Server(url, process, log)


def start_postgres(data_dir: Path, timeout: float = 60) -> tuple[str, Callable[[], None]]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (for the store's tests); returns its URL and a stop function.

    PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user.
    """
    bin_dir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL is not installed: apt-get install postgresql")
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data_dir.mkdir(parents=True, exist_ok=True)
    if as_owner:
        shutil.chown(data_dir, "postgres", "postgres")
        for parent in data_dir.parents:  # temporary directories are 0700: let the postgres user through
            if parent == Path(tempfile.gettempdir()) or parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
    port = free_port()
    subprocess.run([*as_owner, str(bin_dir / "initdb"), "-D", str(data_dir), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True, timeout=timeout)
    ctl = [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-w", "-t", str(int(timeout))]
    subprocess.run([*ctl, "-o", f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1", "-l",
                    str(data_dir / "server.log"), "start"], check=True, capture_output=True, timeout=timeout + 10)
    return (f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres",
            lambda: subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True, timeout=timeout + 10))


def start_redis(data_dir: Path, timeout: float = 30) -> tuple[str, Callable[[], None]]:
    """A throwaway Redis server on 127.0.0.1 (Debian's redis-server, for the job queue's tests and
    benches); returns its URL and a stop function."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed: apt-get install redis-server (make debian-tools)")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "redis.log"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
                                "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}; log:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_for(answers, timeout, f"redis-server on port {port}", interval=0.1)
    return url, lambda: stop(process)
