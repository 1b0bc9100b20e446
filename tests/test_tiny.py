"""The tiny local model and tokenizer (grpo/tiny.py) behave like Qwen2.5-Instruct's where the
trainer can tell: ChatML template, eos/pad ids, left padding, hidden sampling defaults, and a
save/load round trip through the Auto classes."""
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.demo import demo_texts
from grpo.tiny import CHAT_TEMPLATE, build_model, build_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
SAMPLES = ["What is the weather in Paris?", "héllo wörld 🙂 naïve café", "a\n\n  b\tc 12345 {\"x\": 1.5}",
           "<|im_start|>user\nhi<|im_end|>\n"]


def test_tokenizer_is_deterministic():
    # Rust's hash maps take fresh random keys for every map, even within one process, so two
    # builds here already differ in hashing; ties between equally frequent pairs must not matter.
    texts = demo_texts()
    first, second = build_tokenizer(texts), build_tokenizer(texts)
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first.get_vocab() == second.get_vocab()


def test_special_tokens_and_ids(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert tok.bos_token is None and tok.unk_token is None
    assert tok.padding_side == "left"
    assert len(tok) <= 2048  # the demo corpus runs out of pairs to merge before 2048
    # special tokens are never split, and no BOS/EOS is added on encode
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"][0] == 1
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"][-1] == 2


def test_byte_level_round_trip(tiny_tokenizer):
    for text in SAMPLES:
        assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_chat_template(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    without = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert without == text.removesuffix("<|im_start|>assistant\n")


def test_left_padding(tiny_tokenizer):
    batch = tiny_tokenizer(["a", "a longer prompt here"], padding=True)
    short_ids, long_ids = batch["input_ids"]
    pad = len(long_ids) - len(tiny_tokenizer("a")["input_ids"])
    assert short_ids[:pad] == [0] * pad and batch["attention_mask"][0][:pad] == [0] * pad


def test_model_config(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size) == (64, 2, 4, 2, 256)
    assert c.vocab_size == len(tiny_tokenizer) and c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (c.eos_token_id, c.pad_token_id, c.bos_token_id) == (2, 0, None)
    assert build_model(tiny_tokenizer, vocab_size=2112).config.vocab_size == 2112


def test_model_init_is_seeded_and_leaves_global_rng_alone(tiny_tokenizer):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = build_model(tiny_tokenizer, seed=7), build_model(tiny_tokenizer, seed=7)
    assert torch.equal(torch.rand(3), expected)  # building models drew nothing from the global RNG
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = build_model(tiny_tokenizer, seed=8)
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_save_and_load_round_trip(tiny_model_dir, tiny_tokenizer):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.eos_token_id, tok.pad_token_id, tok.padding_side) == (2, 0, "left")
    for text in SAMPLES + demo_texts()[:30]:
        assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    reference = build_model(tiny_tokenizer)  # save_tiny_model used the default seed 0
    for (name, p), q in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), name


def test_saved_generation_config_has_qwen_sampling_defaults(tiny_model_dir):
    # kept on purpose: the trainer's tests must show these never reach a rollout
    saved = json.loads((Path(tiny_model_dir) / "generation_config.json").read_text())
    assert saved["do_sample"] is True
    assert (saved["temperature"], saved["top_p"], saved["top_k"], saved["repetition_penalty"]) == (
        0.7, 0.8, 20, 1.05)
    assert saved["eos_token_id"] == [2, 0] and saved["pad_token_id"] == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.generation_config.temperature == 0.7 and model.generation_config.eos_token_id == [2, 0]
