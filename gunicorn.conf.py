# `gunicorn backend.wsgi:app` run from here reads this file: port 9090 and the training worker beside it.
from backend.gunicorn_conf import bind, on_exit, timeout, when_ready, workers  # noqa: F401
