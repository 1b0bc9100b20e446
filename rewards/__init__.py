"""Rewards: pure-Python scorers that turn a completion and its ground truth into numbers (no torch)."""
from rewards.toolrl import RewardConfig, toolrl_reward
