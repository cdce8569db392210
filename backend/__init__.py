"""An RLHF loop inside Label Studio: candidates -> rankings -> preference pairs -> reward model -> PPO."""

__version__ = "0.1.0"


def configure_logging() -> None:
    """One log format for every process: gunicorn's web workers, the training worker, the CLI."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # one line per Label Studio request, and Alembic's per-start chatter, drown the loop's story
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
