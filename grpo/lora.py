"""LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685): train.py --lora_r N.

Each targeted linear layer computes W x + (alpha / r) B A x: W (out, in) stays frozen, only A (r, in) and
B (out, r) train; B starts at zero, so step 0 is the base model exactly. What that saves (docs/PERFORMANCE.md):
- gradients and AdamW's two moments exist for the adapters only (about 1% of Qwen2.5-1.5B's parameters);
- the reference model is the same model with the adapters switched off (`WithoutAdapters`), so --beta > 0
  needs no second copy of the weights.

The adapters go into the HF model in place (peft swaps each targeted nn.Linear for a LoRA layer), so the
same `model` object still generates and still feeds grpo/logprobs.py; the PeftModel around it only saves,
loads, switches the adapters off and merges. The LM head is never targeted: grpo/logprobs.py reads its
weight directly for the chunked log-softmax, where an adapter would be silently skipped.

A checkpoint holds the adapters in peft's own format (adapter_config.json, adapter_model.safetensors), whose
config names the base they sit on; `expected_tensors` lists what a whole one must hold. peft is optional:
it is imported here only, and only when LoRA is used.
"""
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from grpo.model import base_of, load_model

# every linear layer of a Qwen2 / Llama decoder block (attention and MLP); the LM head and embeddings stay out
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
UNREACHABLE = ("lm_head", "embed_tokens")          # read directly by grpo/logprobs.py / not a linear layer


def require_peft() -> None:
    """Raise ImportError when peft is not installed (train.py turns it into one line)."""
    import peft  # noqa: F401


def target_names(targets: str) -> list[str]:
    """'q_proj, v_proj' -> ['q_proj', 'v_proj']."""
    return [t.strip() for t in targets.split(",") if t.strip()]


def missing_targets(model: nn.Module, targets: str) -> list[str]:
    """The names of `targets` that match no nn.Linear inside the decoder (checked before any training)."""
    found = {name.rsplit(".", 1)[-1] for name, m in model.base_model.named_modules() if isinstance(m, nn.Linear)}
    return [t for t in target_names(targets) if t not in found]


def lora_config(r: int, alpha: float, targets: str):
    from peft import LoraConfig
    # no dropout: it would make the log-probs of the update differ from those of the rollout (ratio != 1
    # on-policy), and GRPO's own noise (sampling) is regularisation enough
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=target_names(targets), lora_dropout=0.0, bias="none")


def add_adapters(model: nn.Module, r: int, alpha: float, targets: str, base: str, checkpoint: Path | None = None):
    """Put adapters into `model` in place and freeze everything else; returns the PeftModel around it.
    New adapters (A random, seeded by torch's generator; B zero) or, with `checkpoint`, the saved ones.
    `base` is where the frozen weights come from (recorded in the adapter config, so eval.py finds them)."""
    from peft import PeftModel, get_peft_model
    base = os.path.abspath(base) if os.path.isdir(base) else base   # a local dir from anywhere; a hub id as is
    if checkpoint is None:
        peft_model = get_peft_model(model, lora_config(r, alpha, targets))
    else:
        peft_model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    peft_model.peft_config["default"].base_model_name_or_path = base     # peft would record the loaded path
    return peft_model


class WithoutAdapters(nn.Module):
    """The reference policy: `policy` (a CompletionLogprobs over the adapted model) with the adapters off,
    i.e. the frozen base weights: the policy GRPO started from, at no extra memory."""

    def __init__(self, policy: nn.Module, peft_model):
        super().__init__()
        self.policy, self.peft_model = policy, peft_model

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.policy(*args, **kwargs)


def reference_policy(policy: nn.Module, peft_model, ref_path: str, *, device: str, bf16: bool,
                     trust_remote_code: bool) -> nn.Module:
    """The frozen reference of the KL term: with adapters (`peft_model`), the same weights with them off, at no
    extra memory; otherwise a second copy of the model GRPO starts from (`ref_path`), in bf16 under --bf16."""
    if peft_model is not None:
        return WithoutAdapters(policy, peft_model)
    ref_model = load_model(ref_path, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                           trust_remote_code=trust_remote_code).eval().requires_grad_(False)
    return type(policy)(ref_model, policy.chunk_size)                  # computed as the policy's log-probs are


def save_merged(peft_model, tokenizer, path: Path) -> None:
    """An HF model directory with the adapters folded into the weights (W + (alpha / r) B A), loadable by
    AutoModelForCausalLM.from_pretrained without peft. Folds in place: call it when training is over."""
    from grpo.io import atomic_path
    merged = peft_model.merge_and_unload()
    with atomic_path(path) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def expected_tensors(checkpoint: Path, trust_remote_code: bool = False) -> dict[str, tuple[list[int], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor adapter_model.safetensors must hold: the adapters that the
    saved adapter config puts on the base model's architecture (built on the meta device: no memory)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    config = AutoConfig.from_pretrained(base_of(checkpoint), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        state = get_peft_model_state_dict(get_peft_model(model, LoraConfig.from_pretrained(checkpoint)))
    return {name: (list(t.shape), t.dtype) for name, t in state.items()}


def saved_tensors(checkpoint: Path) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, safetensors dtype)} from adapter_model.safetensors' header; a truncated file fails here."""
    if not (checkpoint / "adapter_model.safetensors").is_file():
        raise ValueError("missing adapter_model.safetensors")
    with safe_open(checkpoint / "adapter_model.safetensors", framework="pt") as f:
        return {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}
