"""An RLHF loop inside Label Studio: candidates -> rankings -> preference pairs -> reward model -> PPO."""

__version__ = "0.1.0"
