"""Export: preference pairs (store rows, `PreferencePair`s or dicts) in, a dataset for trl out.

- "trl": JSON Lines, one {"prompt", "chosen", "rejected", "margin"} object a pair: trl's standard
  preference format with an explicit prompt. trl 1.16's RewardTrainer uses `margin` in its loss
  (-logsigmoid(r_chosen - r_rejected - margin)); DPOTrainer ignores the column.
- "hf": the same columns plus where each pair came from (project, task, annotator, annotation,
  policy versions), as a `datasets.Dataset` directory (`save_to_disk`; `load_from_disk` reads it).

trl tokenizes `prompt + chosen` as one plain string (RewardTrainer._prepare_dataset), and the
candidates are stored stripped, so the exported prompt ends with the newline that
`generation.render_prompt` puts after a prompt when the policy has no chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from backend.preferences import pair_field

FORMATS = ("trl", "hf")
TRL_COLUMNS = ("prompt", "chosen", "rejected", "margin")
PROVENANCE_COLUMNS = ("project_id", "task_id", "annotator", "annotation_id",
                      "chosen_policy_version", "rejected_policy_version")


def _get(record, key: str, index: int, required: bool = True):
    value = pair_field(record, key)
    if required and value is None:
        raise ValueError(f"pair {index} has no {key!r}: export needs prompt, chosen and rejected on every pair")
    return value


def _prompt(text: str) -> str:
    return text if not text or text[-1].isspace() else text + "\n"


def trl_rows(pairs: Iterable) -> list[dict]:
    """One {"prompt", "chosen", "rejected", "margin"} dict a pair, ready for trl."""
    return [{"prompt": _prompt(str(_get(p, "prompt", i))), "chosen": str(_get(p, "chosen", i)),
             "rejected": str(_get(p, "rejected", i)), "margin": float(_get(p, "margin", i, required=False) or 0.0)}
            for i, p in enumerate(pairs)]


def dump_jsonl(pairs: Iterable, stream: TextIO) -> int:
    """Write the trl rows to an open text stream, one JSON object a line; returns the number of pairs."""
    rows = trl_rows(pairs)
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def write_jsonl(pairs: Iterable, path: Path) -> int:
    """Write the trl rows to `path`, one JSON object a line; returns the number of pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        return dump_jsonl(pairs, out)


def save_hf(pairs: Iterable, path: Path) -> int:
    """Save the trl rows plus provenance columns as a `datasets` dataset directory; returns the number of pairs."""
    from datasets import Dataset, Features, Value  # heavy import: only the export command pays for it

    pairs = list(pairs)
    rows = trl_rows(pairs)
    for row, pair in zip(rows, pairs):
        row.update({key: _get(pair, key, 0, required=False) for key in PROVENANCE_COLUMNS})
    features = Features({**{k: Value("string") for k in TRL_COLUMNS[:3]}, "margin": Value("float64"),
                         **{k: Value("int64") for k in PROVENANCE_COLUMNS}})
    Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return len(rows)


def export_pairs(pairs: Iterable, fmt: str, path: Path | TextIO) -> int:
    """Write `pairs` in format `fmt` ("trl" or "hf") to `path` (trl also takes an open stream); returns the count."""
    pairs = list(pairs)
    if not pairs:  # also: datasets 5.2's load_from_disk fails on the dataset save_to_disk writes for no rows
        raise ValueError("there are no preference pairs to export: annotate some tasks first")
    if fmt == "trl":
        return write_jsonl(pairs, path) if isinstance(path, Path) else dump_jsonl(pairs, path)
    if not isinstance(path, Path):
        raise ValueError("--format hf writes a dataset directory: pass --out DIR")
    if fmt == "hf":
        return save_hf(pairs, path)
    raise ValueError(f"export format {fmt!r} is not supported: use one of {', '.join(FORMATS)}")
