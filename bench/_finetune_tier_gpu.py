"""The fine-tuned reward tier (trl's RewardTrainer on MiniLM) on HH-harmless: for a GPU machine.

`make bench` skips it (its name starts with "_"): full fine-tuning takes about 15 minutes a fit on
2 CPU cores. Same 4-fold split by prompt as bench/reward_learning.py's first split; three settings:
LoRA r=8 for 2 epochs (the CPU default), every weight for 2 and for 4 epochs. Prints one RESULT line
each. Measured on an NVIDIA H200 (docs/reward.md): 0.599 / 0.615 / 0.631, 5-9 s a fit
(that run used an equivalent script with the backbone saved in fp16 to fit the transfer limit).

    python bench/_finetune_tier_gpu.py [--pairs FILE] [--base DIR]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from reward_learning import split  # noqa: E402

from backend.models import DEFAULT_ENCODER, resolve_encoder  # noqa: E402
from backend.reward_training import UpdatePolicy, finetune_reward_model, read_pairs, pair_margins  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=Path, default=ROOT.parent / "shared" / "data" / "hh_harmless_dev.jsonl")
    parser.add_argument("--base", default=None, help="backbone checkpoint; default: the bundled MiniLM")
    args = parser.parse_args()
    base = args.base or resolve_encoder(DEFAULT_ENCODER)
    print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
    pairs = read_pairs(args.pairs)
    fold = split([p.prompt for p in pairs], repeat=0)
    for rank, epochs in ((8, 2), (0, 2), (0, 4)):
        correct, seconds = np.zeros(len(pairs), bool), []
        for k in range(4):
            train = [pairs[i] for i in np.flatnonzero(fold != k)]
            held = [pairs[i] for i in np.flatnonzero(fold == k)]
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as scratch:
                model = finetune_reward_model(base, [p.prompt for p in train], [p.chosen for p in train],
                                              [p.rejected for p in train], [p.margin for p in train],
                                              UpdatePolicy(finetune_epochs=epochs, finetune_lora_rank=rank),
                                              Path(scratch))
            seconds.append(time.perf_counter() - started)
            correct[fold == k] = pair_margins(model, held) > 0
        print(f"RESULT lora_rank={rank} epochs={epochs}: accuracy {correct.mean():.3f} over {len(pairs)} held-out "
              f"pairs, median fit {np.median(seconds):.1f}s", flush=True)


if __name__ == "__main__":
    main()
