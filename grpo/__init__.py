"""GRPO, from scratch: the algorithm's pieces as small modules that train.py strings together.

    loss.py      group-relative advantages, clipped surrogate, k3 KL (the math)
    logprobs.py  completion-only, chunked log-probs and entropies
    rollout.py   sampling G completions per prompt with HF generate, completion masks
    model.py     loading models and tokenizers
    tiny.py      a tiny Qwen2 model and tokenizer built locally, for tests and the offline demo
    cli.py       a dataclass config turned into a command line
"""
from grpo.loss import group_advantages  # noqa: F401  (the issue's `grpo.group_advantages`)
