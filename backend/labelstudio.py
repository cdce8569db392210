"""Label Studio adapter: loop records in, Label Studio API calls out (and prompts files in, tasks out).

Candidates are task data, so writing them is a task update. Label Studio's SQLite backend
drops some concurrent task updates (shared/label-studio/README.md: 6 of 44 parallel updates
lost), so one writer updates tasks one at a time, with retries.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

from label_studio_sdk import LabelStudio

from backend.labelconfig import RankingSchema

log = logging.getLogger(__name__)


class PromptFileError(ValueError):
    """A prompts file that cannot be read; the message names the file, the line and the fix."""


def connect(url: str, api_key: str) -> LabelStudio:
    if not api_key:
        raise ValueError("LABEL_STUDIO_API_KEY is empty: set it to your Label Studio access token (Account & Settings)")
    return LabelStudio(base_url=url, api_key=api_key)


def write_task_data(client: LabelStudio, task_id: int, data: dict, attempts: int = 4) -> None:
    """Replace a task's data, retrying with backoff: a lost candidate write would leave a task unrankable."""
    for attempt in range(attempts):
        try:
            client.tasks.update(id=str(task_id), data=data)
            return
        except Exception as exc:  # the SDK raises several transport and API error types
            if attempt == attempts - 1:
                raise
            delay = 0.5 * 2**attempt
            log.warning("updating task %s failed (%s); retrying in %.1fs", task_id, exc, delay)
            time.sleep(delay)


def replace_predictions(client: LabelStudio, task_id: int, prediction: dict | None) -> None:
    """Delete a task's predictions and store `prediction` instead (None: none, so Label Studio asks /predict).

    Label Studio keeps a prediction until its model_version changes; after new candidates, the old one
    orders text the task no longer shows."""
    for old in client.predictions.list(task=task_id):
        client.predictions.delete(id=old.id)
    if prediction is not None and prediction.get("result"):
        client.predictions.create(task=task_id, result=prediction["result"], score=prediction["score"],
                                  model_version=prediction["model_version"])


def backend_webhooks(client: LabelStudio, project_id: int) -> list:
    """The project's webhooks to `/webhook` of one of its ML connections: the ones Label Studio creates."""
    urls = {ml.url.rstrip("/") + "/webhook" for ml in client.ml.list(project=project_id) if ml.url}
    return [hook for hook in client.webhooks.list(project=str(project_id)) if hook.url.rstrip("/") in urls]


def iter_tasks(client: LabelStudio, project_id: int) -> Iterator[dict]:
    """Every task of a project as a plain dict (id, data, total_annotations, ...)."""
    for task in client.tasks.list(project=project_id, fields="all"):
        yield task.model_dump() if hasattr(task, "model_dump") else dict(task)


def unannotated_task_ids(client: LabelStudio, project_id: int) -> list[int]:
    """Tasks nobody has annotated yet: the ones whose candidates a new policy may replace."""
    return [t["id"] for t in iter_tasks(client, project_id) if not t.get("total_annotations") and not t.get("is_labeled")]


def read_prompts(path: Path) -> list[str]:
    """Prompts from JSONL (`{"prompt": ...}` per line), CSV (a `prompt` column) or plain text (one per line)."""
    if not path.is_file():
        raise PromptFileError(f"prompts file {str(path)!r} does not exist: pass a .jsonl, .csv or .txt file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        prompts = [_jsonl_prompt(line, path, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise PromptFileError(f"{path}: CSV needs a 'prompt' column, found columns {reader.fieldnames}")
        prompts = [row["prompt"].strip() for row in reader if (row.get("prompt") or "").strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found")
    return prompts


def _jsonl_prompt(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path}:{number}: not JSON ({exc.msg}): each line must be {{\"prompt\": \"...\"}}") from None
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise PromptFileError(f"{path}:{number}: needs a non-empty string field 'prompt', got {line.strip()[:80]!r}")
    return record["prompt"].strip()


def prompt_tasks(prompts: list[str], schema: RankingSchema) -> list[dict]:
    """Import records: Label Studio refuses a task without the candidate field, so it starts empty."""
    return [{"data": {schema.prompt_field: p, **schema.candidate_data([])}} for p in prompts]


def import_prompts(client: LabelStudio, project_id: int, prompts: list[str], schema: RankingSchema) -> list[int]:
    return import_tasks(client, project_id, prompt_tasks(prompts, schema))


def import_tasks(client: LabelStudio, project_id: int, tasks: list[dict]) -> list[int]:
    """Create tasks (`{"data": ...}` each) in the project; returns their ids, in order."""
    response = client.projects.import_tasks(id=project_id, request=tasks, return_task_ids=True)
    return list(response.task_ids or [])
