"""`rlhf-backend reward ...`: offline reward-model commands on prompt/chosen/rejected JSONL files.

- fit:      pairs in, a reward-model directory out (either tier; the same format the worker publishes)
- eval:     a reward-model directory and pairs in, held-out metrics out (last line `accuracy: 0.xxx`)
- rollback: a published version number in, that version serving again (newer ones retired)
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

reward_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fit, evaluate and roll back reward models.")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _settings():
    from backend.settings import SettingsError, load_settings

    try:
        return load_settings()
    except SettingsError as exc:
        raise _fail(str(exc)) from None


def _encoder(settings, cache: Path | None):
    """The frozen encoder of REWARD_MODEL, its embeddings cached in `cache` (SQLite) or the backend's store."""
    from backend.models import load_encoder, resolve_encoder
    from backend.reward import TextEncoder
    from backend.store import Store

    if cache is None:
        settings.model_dir.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{cache.resolve()}" if cache else settings.store_url)
    store.create_schema()
    model, tokenizer = load_encoder(resolve_encoder(settings.reward_model))
    return TextEncoder(model, tokenizer, name=settings.reward_model, store=store)


def _pairs(path: Path):
    from backend.reward_training import read_pairs

    try:
        return read_pairs(path)
    except (OSError, ValueError) as exc:
        raise _fail(str(exc)) from None


@reward_app.command()
def fit(pairs: Path = typer.Option(..., "--pairs", help="prompt/chosen/rejected JSONL"),
        out: Path = typer.Option(..., "--out", help="Directory to write the reward model to (replaced atomically)"),
        tier: str = typer.Option("head", help="'head' (Bradley-Terry heads on frozen embeddings, n-grams and structure counts) or 'finetune' (RewardTrainer)"),
        cache: Path = typer.Option(None, help="SQLite file caching embeddings across runs; default: the backend's store")) -> None:
    """Fit a reward model on every pair of the file."""
    import torch

    from backend.models import resolve_encoder
    from backend.reward import RewardModel, refit
    from backend.reward_training import UpdatePolicy, finetune_reward_model

    if tier not in ("head", "finetune"):
        raise _fail(f"--tier {tier!r} is not supported: use 'head' or 'finetune'")
    settings = _settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    rows = _pairs(pairs)
    started = time.perf_counter()
    prompts, chosen, rejected = [p.prompt for p in rows], [p.chosen for p in rows], [p.rejected for p in rows]
    margins = [p.margin for p in rows]
    if tier == "head":
        model = refit(RewardModel(_encoder(settings, cache)), prompts, chosen, rejected, margins)
    else:
        model = finetune_reward_model(resolve_encoder(settings.reward_model), prompts, chosen, rejected, margins,
                                      UpdatePolicy(), out.parent / f".{out.name}-trainer", seed=settings.seed)
    model.save(out)
    typer.echo(f"fitted a {tier} reward model on {len(rows)} pairs in {time.perf_counter() - started:.1f}s -> {out}")


@reward_app.command("eval")
def eval_(model: Path = typer.Option(..., "--model", help="A reward-model directory (from fit or MODEL_DIR/reward)"),
          pairs: Path = typer.Option(..., "--pairs", help="prompt/chosen/rejected JSONL"),
          cache: Path = typer.Option(None, help="SQLite file caching embeddings across runs; default: the backend's store")) -> None:
    """Pairwise accuracy (with its 95% interval) and calibration of a reward model on every pair of the file."""
    from backend.reward import load_reward_model
    from backend.reward_training import evaluate_margins, pair_margins

    if not (model / "meta.json").exists():
        raise _fail(f"--model {model} is not a reward-model directory (no meta.json): pass the directory `fit` wrote")
    rows = _pairs(pairs)
    settings = _settings()
    try:
        reward = load_reward_model(model, _encoder(settings, cache))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    result = evaluate_margins(pair_margins(reward, rows))
    typer.echo(f"pairs: {result.pairs}")
    typer.echo(f"accuracy 95% interval: {result.accuracy_low:.3f}-{result.accuracy_high:.3f}")
    typer.echo(f"log loss: {result.log_loss:.4f}")
    typer.echo(f"expected calibration error: {result.ece:.4f}")
    typer.echo(f"accuracy: {result.accuracy:.3f}")


@reward_app.command()
def rollback(version: int = typer.Argument(..., help="The published reward version to serve again"),
             project: int = typer.Option(..., "--project", help="Label Studio project id")) -> None:
    """Serve an earlier reward-model version of the project again; /predict and PPO pick it up on their next call."""
    from backend.reward_training import rollback_reward
    from backend.store import Store

    settings = _settings()
    store = Store(settings.store_url)
    store.create_schema()
    try:
        retired = rollback_reward(store, project, version)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"project {project}: reward v{version} serves again ({retired} newer version(s) retired)")
