"""The WSGI entry point: `gunicorn backend.wsgi:app` (settings from the environment, read once)."""

import logging

from backend.app import create_app
from backend.settings import load_settings

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(load_settings())
