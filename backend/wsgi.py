"""The WSGI entry point: `gunicorn backend.wsgi:app` (settings from the environment, read once)."""

from backend import configure_logging
from backend.app import create_app
from backend.settings import load_settings

configure_logging()
app = create_app(load_settings())
