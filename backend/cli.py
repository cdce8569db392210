"""The `rlhf-backend` command: serve, worker, import, sync, train, export, status, rollbacks, demo."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import typer

from backend import __version__, configure_logging
from backend.reward_cli import reward_app
from backend.settings import SettingsError, load_settings

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="An RLHF loop inside Label Studio.",
                  epilog="Settings come from environment variables, read once and validated (README, Settings): "
                         "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for commands that talk to Label Studio, "
                         "MODEL_DIR (or DATABASE_URL) for every command that reads the store.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rlhf-backend {__version__}")
        raise typer.Exit()


@cli.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit")) -> None:
    pass


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _settings():
    try:
        return load_settings()
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@cli.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to bind"),
          port: int = typer.Option(9090, help="Port to bind"),
          workers: int = typer.Option(2, help="gunicorn web workers"),
          worker: bool = typer.Option(True, help="Also run the supervised training workers (--no-worker: they run "
                                                 "elsewhere, as `rlhf-backend worker`, on one store and queue)")) -> None:
    """Serve the ML backend with gunicorn, plus the training workers."""
    settings = _settings()  # fail here, with one line, rather than inside every gunicorn worker
    if not is_loopback(host) and settings.basic_auth is None and not settings.allow_unauthenticated:
        typer.echo(f"error: --host {host} would let anyone who reaches port {port} write into your Label Studio "
                   "tasks and train on forged rankings: set BASIC_AUTH_USER and BASIC_AUTH_PASS (and enter them "
                   "in Label Studio's model connection), or ALLOW_UNAUTHENTICATED=true on a trusted network", err=True)
        raise typer.Exit(2)
    config = "python:backend.gunicorn_conf" if worker else "python:backend.gunicorn_web"
    args = [sys.executable, "-m", "gunicorn", "-c", config,
            "--bind", f"{host}:{port}", "--workers", str(workers), "backend.wsgi:app"]
    os.execv(sys.executable, args)


@cli.command()
def worker(lane: str = typer.Option("split", help="Jobs to run: 'split' = a fast and a train worker, so candidates "
                                                 "and reward updates never wait behind a policy update; or one of "
                                                 "fast, train, all"),
           supervised: bool = typer.Option(True, help="Restart workers whenever they die (--no-supervised: run one "
                                                      "worker process in the foreground)"),
           threads: int = typer.Option(0, help="torch threads when TORCH_THREADS is 0 (auto); 'split' gives each "
                                               "lane half the cores, and the train lane every core while the "
                                               "fast lane idles")) -> None:
    """Run the training workers (generation, reward fitting, policy updates); several may share one store."""
    configure_logging()
    settings = _settings()
    lanes = ["fast", "train"] if lane == "split" else [lane]
    if not set(lanes) <= {"fast", "train", "all"}:
        typer.echo(f"error: --lane {lane!r} is not one of split, fast, train, all", err=True)
        raise typer.Exit(2)
    if supervised:
        from backend.store import Store
        from backend.supervisor import supervise

        store = Store(settings.store_url, settings.redis_url)
        store.create_schema()
        # side by side, each lane gets its share of the cores: 2 + 2 threads on 2 cores made generation
        # during PPO 4.9x slower than idle (docs/queue.md)
        share = max(1, (os.cpu_count() or 1) // len(lanes)) if len(lanes) > 1 else 0
        supervise([[sys.executable, "-m", "backend.cli", "worker", "--no-supervised", "--lane", name,
                    "--threads", str(share)] for name in lanes], store)
        return
    if len(lanes) > 1:
        typer.echo("error: --no-supervised runs one worker: pass --lane fast, train or all", err=True)
        raise typer.Exit(2)
    from backend.worker import run_worker

    run_worker(settings, lane=lanes[0], threads=threads)


@cli.command("import")
def import_(file: Path = typer.Argument(..., help="Prompts: .jsonl ({\"prompt\": ...}), .csv (prompt column) or .txt"),
            project: int = typer.Option(..., "--project", help="Label Studio project id")) -> None:
    """Import prompts as tasks with an empty candidate list (the backend fills it)."""
    from backend import labelstudio
    from backend.labelconfig import LabelConfigError, parse_ranking_schema

    settings = _settings()
    try:
        prompts = labelstudio.read_prompts(file)
        client = labelstudio.connect(settings.label_studio_url, settings.label_studio_api_key)
        schema = parse_ranking_schema(client.projects.get(id=project).label_config)
    except (ValueError, LabelConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    ids = labelstudio.import_prompts(client, project, prompts, schema)
    typer.echo(f"imported {len(ids)} prompts into project {project}")


@cli.command()
def sync(project: int = typer.Option(..., "--project", help="Label Studio project id")) -> None:
    """Make the store's pairs equal to the project's annotations in Label Studio."""
    from backend import labelstudio
    from backend.store import Store
    from backend.sync import sync_project

    settings = _settings()
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    try:
        client = labelstudio.connect(settings.label_studio_url, settings.label_studio_api_key)
        report = sync_project(store, client, project)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    store.enqueue("fit_reward", project)
    typer.echo(f"project {project}: {report}")


@cli.command()
def train(project: int = typer.Option(..., "--project", help="Label Studio project id"),
          wait: bool = typer.Option(False, "--wait", help="Follow the run's events until it ends")) -> None:
    """Queue a policy update now, whatever the pair count (the running worker picks it up)."""
    import time

    from tqdm import tqdm

    from backend.store import Store

    settings = _settings()
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    last_event = max((e["id"] for e in store.events(limit=1)), default=0)  # the newest
    store.enqueue("sync", project)  # as "Start training" does: catch up with Label Studio first
    job_id = store.enqueue("train_policy", project)  # absorbed by a run already queued or running
    typer.echo(f"policy update queued as job {job_id}")
    steps = None  # a progress bar over the update's steps, the other events printed above it
    while wait:
        for event in store.events(after_id=last_event, project_id=project):
            last_event = event["id"]
            planned = event["data"].get("planned_steps")
            if event["kind"] == "ppo_step" and planned:
                steps = steps or tqdm(total=planned, desc="policy update", unit="step")
                steps.update(event["data"]["step"] - steps.n)
            else:
                (steps.write if steps else typer.echo)(f"[{event['kind']}] {event['message']}")
        state = store.job_state(job_id)
        if state in ("done", "failed"):
            if steps:
                steps.close()
            raise typer.Exit(0 if state == "done" else 1)
        time.sleep(2)


@cli.command()
def export(project: int = typer.Option(..., "--project", help="Label Studio project id"),
           fmt: str = typer.Option("trl", "--format", help="trl: JSON Lines for trl; hf: a datasets directory"),
           out: Path = typer.Option(None, "--out", help="File (trl) or directory (hf); trl defaults to stdout")) -> None:
    """Write the project's preference pairs (prompt/chosen/rejected/margin) from the store; no Label Studio needed."""
    from backend.export import export_pairs
    from backend.store import Store

    settings = _settings()
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    try:
        count = export_pairs(store.pairs(project), fmt, out or sys.stdout)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {count} pairs of project {project} to {out or 'stdout'}", err=True)


cli.add_typer(reward_app, name="reward")

policy_cli = typer.Typer(no_args_is_help=True, help="Policy versions.")
cli.add_typer(policy_cli, name="policy")


@policy_cli.command("rollback")
def policy_rollback(version: int = typer.Argument(..., help="Policy version to serve again"),
                    project: int = typer.Option(..., "--project", help="Label Studio project id")) -> None:
    """Serve an older policy of the project again; its unannotated tasks get candidates from it."""
    from backend.store import Store

    settings = _settings()
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    try:
        retired = store.rollback("policy", project, version)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    store.enqueue("regenerate", project)
    store.log_event("rollback", f"policy rolled back to v{version} ({retired} newer version(s) retired)",
                    project=project)
    typer.echo(f"project {project}: policy v{version} is served again; {retired} newer version(s) retired")


@cli.command()
def status(project: int = typer.Option(None, "--project", help="Label Studio project id (default: the first)"),
           as_json: bool = typer.Option(False, "--json", help="The JSON of GET /api/status instead of tables")) -> None:
    """Print a project's loop as the status page shows it, read from the store (MODEL_DIR or DATABASE_URL)."""
    from backend.registry import ModelRegistry
    from backend.status import loop_status
    from backend.store import Store

    settings = _settings()
    store = Store(settings.store_url, settings.redis_url)
    store.create_schema()
    state = loop_status(store, ModelRegistry(settings, store), project)
    if as_json:
        typer.echo(state.model_dump_json(indent=2))
    else:
        _print_status(state)


def _print_status(state) -> None:
    """The status page's numbers as tables: projects, reward versions, policy updates, jobs."""
    from rich.console import Console
    from rich.table import Table

    def table(title: str, columns: list[str], rows: list[list]) -> Table:
        t = Table(title=title, title_justify="left")
        for column in columns:
            t.add_column(column)
        for row in rows:
            t.add_row(*("" if v is None else str(v) for v in row))
        return t

    console = Console()
    console.print(table("projects", ["project", "model_version", "pairs"],
                        [[("* " if p.id == state.project else "") + str(p.id), p.model_version, p.pairs]
                         for p in state.projects]))
    if state.project is None:
        console.print("no project connected yet")
        return
    console.print(table(f"project {state.project}: reward model versions", ["version", "held-out accuracy", "95% interval",
                                                                            "held-out pairs", "train pairs"],
                        [[v.version, _fmt(v.held_out_accuracy), f"{_fmt(v.accuracy_low)}-{_fmt(v.accuracy_high)}",
                          v.held_out_pairs, v.train_pairs] for v in state.reward_versions]))
    console.print(table(f"project {state.project}: policy updates", ["started", "algorithm", "steps", "outcome",
                                                                     "verdict"],
                        [[u.started_at[:19], u.algorithm, len(u.steps), u.outcome + (f" v{u.version}" if u.version else ""),
                          u.verdict] for u in state.policy_updates]))
    console.print(table("jobs", ["lane", "job", "project", "state", "progress", "ETA (s)"],
                        [[j.lane, f"{j.kind} #{j.id}", j.project, j.state,
                          None if j.progress is None else f"{j.progress:.0%}",
                          None if j.eta_seconds is None else round(j.eta_seconds)] for j in state.jobs]))
    console.print(f"workers alive {state.workers.alive}, busy {state.workers.busy}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@cli.command()
def demo(port: int = typer.Option(8080, help="Label Studio port"),
         backend_port: int = typer.Option(9090, help="Backend port"),
         exit_when_done: bool = typer.Option(False, help="Stop both servers after the first policy update (CI)")) -> None:
    """Start Label Studio and the backend, run a scripted annotator through the loop, keep both running."""
    configure_logging()
    from backend.demo import run_demo

    run_demo(_settings(), ls_port=port, backend_port=backend_port, exit_when_done=exit_when_done)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
