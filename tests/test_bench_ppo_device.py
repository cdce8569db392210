"""bench/ppo_device.py end to end on a tiny random Llama: the table it prints and the numbers it saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import ppo_device  # noqa: E402


def test_ppo_device_bench_reports_speed_and_memory_per_batch_size(tiny_policy, tmp_path, capsys):
    out = tmp_path / "ppo_device.json"
    ppo_device.main(["--policy", str(tiny_policy), "--random-weights", "--device", "cpu", "--batch-sizes", "2", "4",
                     "--steps", "2", "--max-new-tokens", "4", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch_size"] for r in rows] == [2, 4]
    for r in rows:
        assert r["rollout_tokens_per_s"] > 0 and 0 < r["seconds_per_update"] < r["seconds_per_step"]
        assert r["peak_memory_gb"] > 0
    table = capsys.readouterr().out
    assert "| prompts a step | rollout tokens/s |" in table and "random weights" in table
