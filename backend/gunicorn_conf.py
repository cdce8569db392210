"""gunicorn hooks: start one supervised training worker beside the web workers, and stop it with them.

Used by `rlhf-backend serve`; with plain gunicorn: `gunicorn -c python:backend.gunicorn_conf backend.wsgi:app`.
The training worker is a separate process (not a thread in a web worker) so a PPO run never
slows a webhook and several web workers never train twice.
"""

import subprocess
import sys

from backend.gunicorn_web import bind, timeout, workers  # noqa: F401  (gunicorn reads them from here)

_training = {}


def when_ready(server):
    _training["process"] = subprocess.Popen([sys.executable, "-m", "backend.cli", "worker"])
    server.log.info("training worker supervisor started (pid %s)", _training["process"].pid)


def on_exit(server):
    process = _training.get("process")
    if process and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)  # the supervisor gives its worker 20 s to finish its job
        except subprocess.TimeoutExpired:
            process.kill()
