import json
from types import SimpleNamespace

import pytest
from datasets import load_dataset, load_from_disk
from transformers import AutoTokenizer

from backend.export import export_pairs, trl_rows, write_jsonl
from backend.preferences import PreferencePair


def pair(prompt="What is 2+2?", chosen="4", rejected="5", margin=2.0, **extra) -> PreferencePair:
    return PreferencePair(project_id=1, task_id=3, annotator=7, prompt=prompt, chosen=chosen, rejected=rejected,
                          margin=margin, chosen_policy_version=0, rejected_policy_version=1, annotation_id=11, **extra)


def test_trl_jsonl_has_exactly_prompt_chosen_rejected_margin_per_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    assert write_jsonl([pair(), pair(chosen="four", margin=0.0)], path) == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"prompt": "What is 2+2?\n", "chosen": "4", "rejected": "5", "margin": 2.0}
    assert lines[1]["chosen"] == "four" and lines[1]["margin"] == 0.0


def test_store_rows_and_dicts_export_like_pairs():
    row = SimpleNamespace(prompt="p", chosen="a", rejected="b", margin=None)
    assert trl_rows([row, {"prompt": "p", "chosen": "a", "rejected": "b"}]) == [
        {"prompt": "p\n", "chosen": "a", "rejected": "b", "margin": 0.0}] * 2


def test_prompt_keeps_its_own_trailing_whitespace():
    assert trl_rows([pair(prompt="Q:\n")])[0]["prompt"] == "Q:\n"


def test_pair_without_rejected_text_is_refused_with_its_index():
    with pytest.raises(ValueError, match="pair 1 has no 'rejected'"):
        trl_rows([pair(), {"prompt": "p", "chosen": "a"}])


def test_unknown_format_is_refused_with_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match="trl, hf"):
        export_pairs([pair()], "csv", tmp_path / "x")


def test_hf_dataset_round_trips_with_provenance_columns(tmp_path):
    assert export_pairs([pair(), pair(chosen="four")], "hf", tmp_path / "ds") == 2
    dataset = load_from_disk(str(tmp_path / "ds"))
    assert dataset.column_names[:4] == ["prompt", "chosen", "rejected", "margin"]
    assert dataset[1]["chosen"] == "four" and dataset[0]["annotation_id"] == 11 and dataset[0]["rejected_policy_version"] == 1


@pytest.mark.parametrize("fmt", ["trl", "hf"])
def test_exporting_no_pairs_is_refused_and_writes_nothing(tmp_path, fmt):
    with pytest.raises(ValueError, match="no preference pairs"):
        export_pairs([], fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trl_reward_trainer_tokenizes_the_export_with_prompt_and_margin(tmp_path, tiny_policy):
    from trl import RewardConfig, RewardTrainer

    path = tmp_path / "pairs.jsonl"
    write_jsonl([pair(), pair(prompt="Hi", chosen="Hello", rejected="Go away", margin=0.0)], path)
    dataset = load_dataset("json", data_files=str(path), split="train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy)
    config = RewardConfig(output_dir=str(tmp_path / "out"), max_length=64, use_cpu=True, bf16=False, report_to=[])
    # RewardTrainer's own preparation, without a model (trl is pinned to 1.16.0 in pyproject.toml)
    prepared = RewardTrainer._prepare_dataset(None, dataset, tokenizer, config, "train")
    assert prepared.num_rows == 2 and prepared["margin"] == [2.0, 0.0]
    assert tokenizer.decode(prepared[0]["chosen_ids"]) == "What is 2+2?\n4" + tokenizer.eos_token
    assert tokenizer.decode(prepared[0]["rejected_ids"]) == "What is 2+2?\n5" + tokenizer.eos_token
