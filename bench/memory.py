"""How much accelerator memory does a GRPO step need, phase by phase, and which batch sizes fit?

    python bench/memory.py --config qwen2.5-1.5b                       # the paper's recipe (train.py's defaults)
    python bench/memory.py --config qwen2.5-1.5b --micro_batch_size 4 --max_new_tokens 512 --beta 0
    python bench/memory.py --config qwen2.5-0.5b --measure --data ../shared/data/toolrl/rlla_4k_test.parquet \\
        --bf16 true --beta 0.001 --prompts_per_step 2 --num_generations 2 --max_new_tokens 32 --micro_batch_size 2

Every flag but this script's own (`--config`, `--device`, `--trainable_params`, `--headroom`, `--measure`, `--data`,
`--keep`) is a train.py flag and means what it means there. The plan is the peak of each phase, term by term, for
every prompt at --max_prompt_length and every completion at --max_new_tokens (the worst case); then, for 24, 48, 80
and 141 GB, the largest --micro_batch_size and --generation_batch_size whose phases fit in --headroom of it.

`--measure` runs train.py itself (`train.main`, --max_steps of it, 2 by default here) on a random-weight model of
--config saved with Qwen2.5's real tokenizer (bench/qwen25_tokenizer.py) on the prompts of --data, and prints each
step's measured peak per phase beside the plan for the lengths that step really had: CUDA's max_memory_allocated,
or on a CPU the peak RSS, with the plan plus the process's baseline (Python, torch, transformers, tokenizer and
data: the RSS just before train.py loads the model, measured; glibc set to return freed blocks, so that RSS
follows the live tensors). docs/PERFORMANCE.md has the validation table.

Notation: n parameters, n_t of them trainable (all, or LoRA's adapters), a bytes per activation value (2 under bf16
autocast, 4 in float32), H hidden size, I intermediate size, V vocabulary, L layers, G completions per prompt.
"""
import multiprocessing
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))        # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from transformers import Qwen2Config  # noqa: E402

from grpo.cli import field, parse_config  # noqa: E402

BUDGETS_GB = (24, 48, 80, 141)            # an RTX 4090 / L40S-class card, A6000-class, A100 / H100 80 GB, H200


def sizes(c: Qwen2Config) -> dict:
    """Parameter counts of a Qwen2 model with tied embeddings, and K + V elements per token of its KV cache."""
    head_dim = c.hidden_size // c.num_attention_heads
    n_head = c.vocab_size * c.hidden_size                                    # the (tied) LM head
    n_body = (c.num_hidden_layers * (c.hidden_size * head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
                                     + head_dim * (c.num_attention_heads + 2 * c.num_key_value_heads)   # q/k/v bias
                                     + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
              + c.hidden_size)                                                # final norm
    kv_elements = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim  # per token
    # LoRA adapters per unit of rank: A (r, in) + B (out, r) on q, k, v, o, gate, up, down of every layer
    kv = c.num_key_value_heads * head_dim
    lora_per_rank = c.num_hidden_layers * (2 * 2 * c.hidden_size + 2 * (c.hidden_size + kv)
                                           + 3 * (c.hidden_size + c.intermediate_size))
    return dict(n_head=n_head, n_body=n_body, kv_elements=kv_elements, lora_per_rank=lora_per_rank)


def plan(c: Qwen2Config, P: list[int], T: list[int], *, num_generations: int, micro_batch_size: int,
         generation_batch_size: int, logprob_chunk_size: int, beta: float, gradient_checkpointing: bool, bf16: bool,
         old_logprobs: bool, steps_per_generation: int = 1, trainable_params: int | None = None, lora_r: int = 0,
         segment: int | None = None, baseline_gb: float = 0.0, shared_prompt: bool = False) -> dict:
    """The memory (GB) each phase should peak at, term by term, for rows with prompt lengths P and completion lengths
    T (prompt-major), after the first optimizer step (so AdamW's moments exist).

    baseline     what the process holds besides the model: 0 on CUDA (max_memory_allocated counts tensors only);
                 on a CPU, Python + torch + transformers + tokenizer + data, measured
    state        float32 master weights (4 n) + AdamW's two float32 moments (8 n_t)
    grads        float32 gradients (4 n_t), from the first backward to the optimizer step
    casts        bf16: autocast's bf16 copy of every weight (2 n; CUDA and CPU autocast both cache them), held for a
                 whole rollout, through each forward and its backward, and through each old-log-prob forward
    reference    the frozen reference model when beta > 0: 2 n in bf16, 4 n in float32; none with LoRA (--lora_r:
                 the reference is the same weights with the adapters off), whose adapters are the n_t trained
    kv_cache     K and V of every layer for the rows of one generation call (--generation_batch_size), each with
                 its prompt (padded to the longest) + completion + one segment of reserved room (grpo.rollout).
                 V at a bytes; K at 4 even under autocast: the rotary cos/sin follow the float32 residual stream
    prefill      one layer's MLP values (gate, up, their product: 3 I) for the prompt tokens of one call
    sampling     each decode step's float32 logits and probabilities, (rows of one call, V)
    checkpoints  each layer's input for the longest micro-batch, float32 (the residual stream stays float32)
    layer        one decoder layer's activations while it is recomputed and back-propagated, and their
                 gradients: about 2 (4 I + 10 H) values per token of the longest micro-batch (all L layers' when
                 not checkpointing)
                 A micro-batch's tokens: mb (P + T) rows of [prompt | completion]; with --shared_prompt each of its
                 groups' prompts once, k P + mb T (k groups: mb / G rounded up, one more where a group is cut)
    prompt_kv    --shared_prompt only: the k prompts' keys and values of every layer, held while the completions
                 run, one layer's copy joined to its completions' own (every layer's when not checkpointing; the
                 gradient-free log-prob passes hold one layer's copy, so there it is an overestimate), and the
                 completion pass's boolean mask, (k, S, P + S) for its k rows of S = mb T / k completion tokens
    forward_layer  a forward without gradients holds one layer's activations at a time: half of `layer`
    lm_head      one chunk of completion tokens' logits: (m, V) at a bytes, then three float32 (m, V) temporaries
    adamw_step   torch's foreach AdamW: one float32 temporary the size of the trainable parameters

    generation = baseline + state + casts + reference + kv_cache + prefill + sampling
    logprobs   = baseline + state + casts (old log-probs only) + reference + forward_layer + lm_head
    update     = the larger of backward (baseline + state + grads + casts + reference + checkpoints + layer +
                 lm_head) and the optimizer step (baseline + state + grads + reference + adamw_step).
                 When an optimizer step has a single micro-batch, its backward frees the casts and activations as
                 it allocates the gradients (set to None after each step), so backward holds the larger of grads
                 and casts + checkpoints + layer + lm_head instead of their sum (measured: docs/PERFORMANCE.md).
    The state terms are exact (tests/test_bench.py); the others are estimates, checked against measurement in
    docs/PERFORMANCE.md."""
    from grpo.rollout import SEGMENT_TOKENS
    s = sizes(c)
    n = s["n_body"] + s["n_head"]
    n_t = lora_r * s["lora_per_rank"] if lora_r else n if trainable_params is None else trainable_params
    n += n_t if lora_r else 0                                                # the adapters are weights too
    a, G = (2 if bf16 else 4), num_generations
    H, I, V, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    rows = len(P)
    prompts_per_call = min(max(1, rows // G), max(1, generation_batch_size // G))
    live = prompts_per_call * G                                  # rows of one generation call
    mb = min(micro_batch_size, rows)
    cut = mb % G != 0 and G % mb != 0                                    # micro-batches may cut a group
    groups = min(mb, -(-mb // G) + cut) if shared_prompt else mb         # prompts a micro-batch computes
    tokens = groups * max(P) + mb * max(T)                               # the longest micro-batch's positions
    chunk = min(logprob_chunk_size, mb * max(T))
    layer = 2 * (4 * I + 10 * H) * a * tokens                            # one layer, activations + gradients
    kv_bytes = s["kv_elements"] // 2 * (4 + a)                           # K float32 (rotary), V at a, every layer
    S = -(-mb // groups) * max(T)                                        # completion tokens of one packed row
    prompt_kv = (kv_bytes * max(P) * groups * (1 + (1 if gradient_checkpointing else layers) / layers)
                 + groups * S * (max(P) + S))
    terms = dict(baseline=baseline_gb * 1e9, state=4 * n + 8 * n_t, grads=4 * n_t, casts=2 * n if bf16 else 0,
                 reference=(2 if bf16 else 4) * n if beta > 0 and not lora_r else 0,
                 kv_cache=kv_bytes * live * (max(P) + max(T) + (segment or SEGMENT_TOKENS)),
                 prefill=3 * I * a * prompts_per_call * max(P),
                 sampling=2 * 4 * live * V,
                 checkpoints=layers * tokens * H * 4 if gradient_checkpointing else 0,
                 prompt_kv=prompt_kv if shared_prompt else 0,
                 layer=layer * (1 if gradient_checkpointing else layers),
                 forward_layer=layer // 2,
                 lm_head=chunk * V * (a + 3 * 4),
                 adamw_step=4 * n_t)
    t = {k: v / 1e9 for k, v in terms.items()}
    gb = {name: sum(t[k] for k in names) for name, names in phase_terms(old_logprobs).items()}
    accumulates = rows // steps_per_generation > micro_batch_size        # a second micro-batch meets the gradients
    if not accumulates:
        gb["backward"] -= min(t["grads"], sum(t[k] for k in ("casts", "checkpoints", "layer", "prompt_kv", "lm_head")))
    update = max(gb["backward"], gb["optimizer_step"])
    return dict(terms=t, old_logprobs=old_logprobs, accumulates=accumulates, generation=gb["generation"],
                logprobs=gb["logprobs"],
                update=update, backward=gb["backward"], optimizer_step=gb["optimizer_step"],
                peak=max(gb["generation"], gb["logprobs"], update))


def phase_terms(old_logprobs: bool) -> dict[str, tuple[str, ...]]:
    """The terms each phase holds at its peak. The old log-probs' forward runs the policy under autocast (its casts);
    the reference's alone runs a model that is bf16 already."""
    return dict(generation=("baseline", "state", "casts", "reference", "kv_cache", "prefill", "sampling"),
                logprobs=("baseline", "state", *(("casts",) if old_logprobs else ()), "reference", "forward_layer",
                          "prompt_kv", "lm_head"),
                backward=("baseline", "state", "grads", "casts", "reference", "checkpoints", "layer", "prompt_kv",
                          "lm_head"),
                optimizer_step=("baseline", "state", "grads", "reference", "adamw_step"))


def print_plan(p: dict, measured: dict | None = None) -> None:
    """One line per phase: the plan's GB with its terms, and where measured, the measured peak against it."""
    t, phases = p["terms"], phase_terms(p["old_logprobs"])
    listed = lambda names: " + ".join(f"{k} {t[k]:.2f}" for k in names if t[k])              # noqa: E731
    lines = {"generation": listed(phases["generation"]), "logprobs": listed(phases["logprobs"]),
             "update": f"the larger of backward {p['backward']:.2f} ({listed(phases['backward'])}"
                       f"{'' if p['accumulates'] else '; one micro-batch per step: the larger of grads and casts + activations'}"
                       f") and the optimizer step {p['optimizer_step']:.2f} ({listed(phases['optimizer_step'])})"}
    for phase, terms in lines.items():
        seen = (f"measured {measured[phase]:.2f} GB = {measured[phase] / p[phase]:.2f} of "
                if measured and phase in measured else "")
        print(f"memory plan, {phase}: {seen}{p[phase]:.2f} GB planned: {terms}")


# ---------------------------------------------------------------- the command line
@dataclass
class Memory:
    """Memory plan of train.py's GRPO step for a model architecture; every other flag is train.py's."""
    config: str = field("qwen2.5-1.5b", "model architecture (bench/common.py ARCHITECTURES: real config numbers)")
    device: str = field("cuda", "plan for: cuda (--bf16 auto means on), or cpu (auto means off)",
                        choices=["cuda", "cpu"])
    trainable_params: int = field(0, "trainable parameters (0 = all: full fine-tuning); LoRA's adapter count goes "
                                     "here: gradients and AdamW state scale with it, the weights do not")
    headroom: float = field(0.9, "fraction of each budget a plan may use (the rest: CUDA context, fragmentation)")
    measure: bool = field(False, "run train.py on a random-weight model of --config and compare with the plan")
    data: str = field("", "--measure: the prompts, a ToolRL-format file (e.g. ../shared/data/toolrl/"
                          "rlla_4k_test.parquet)")
    keep: str = field("", "--measure: keep the random-weight model and the run in this folder (default: a temp dir)")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's flags, train.py's flags), each flag with the values that follow it."""
    own_names = {f.name for f in fields(Memory)}
    own, rest, target = [], [], None
    for arg in argv:
        if arg.startswith("--"):
            target = own if arg[2:].split("=")[0] in own_names else rest
        (target if target is not None else rest).append(arg)
    return own, rest


def plan_for_flags(m: Memory, cfg, micro_batch_size=None, generation_batch_size=None, P=None, T=None,
                   baseline_gb=0.0) -> dict:
    """The plan of train.py's config `cfg` (every prompt and completion at its maximum unless P, T are given)."""
    from common import ARCHITECTURES
    from grpo.model import use_bf16
    rows = cfg.prompts_per_step * cfg.num_generations
    return plan(Qwen2Config(**ARCHITECTURES[m.config]), P or [cfg.max_prompt_length] * rows,
                T or [cfg.max_new_tokens] * rows, num_generations=cfg.num_generations,
                micro_batch_size=micro_batch_size or cfg.micro_batch_size,
                generation_batch_size=generation_batch_size or cfg.generation_batch_size,
                logprob_chunk_size=cfg.logprob_chunk_size, beta=cfg.beta,
                gradient_checkpointing=cfg.gradient_checkpointing, bf16=use_bf16(cfg.bf16, m.device),
                old_logprobs=cfg.steps_per_generation > 1, steps_per_generation=cfg.steps_per_generation,
                trainable_params=m.trainable_params or None, lora_r=cfg.lora_r,
                baseline_gb=baseline_gb, shared_prompt=cfg.shared_prompt)


def fits(m: Memory, cfg) -> None:
    """Per budget: the largest power-of-two --micro_batch_size (up to a mini-batch's rows) whose log-prob and update
    phases fit, and the largest --generation_batch_size (a multiple of G, up to the rollout's rows) whose
    generation fits, in --headroom of the budget."""
    rows = cfg.prompts_per_step * cfg.num_generations
    micro = [2 ** k for k in range(20) if 2 ** k <= rows // cfg.steps_per_generation]
    generation = [cfg.num_generations * 2 ** k for k in range(20) if cfg.num_generations * 2 ** k <= rows]
    print(f"\nwhat fits (each plan within {m.headroom:.0%} of the budget; every prompt {cfg.max_prompt_length} and "
          f"completion {cfg.max_new_tokens} tokens):")
    print(f"{'GB':>5}  {'--micro_batch_size':>19}  {'update GB':>9}  {'--generation_batch_size':>24}  {'generation GB':>13}")
    for budget in BUDGETS_GB:
        limit = m.headroom * budget
        ok_micro = [(mb, p) for mb in micro if max((p := plan_for_flags(m, cfg, micro_batch_size=mb))["update"],
                                                    p["logprobs"]) <= limit]
        ok_gen = [(g, p) for g in generation if (p := plan_for_flags(m, cfg, generation_batch_size=g))["generation"]
                  <= limit]
        mb_text = (f"{ok_micro[-1][0]:>19}  {max(ok_micro[-1][1]['update'], ok_micro[-1][1]['logprobs']):>9.1f}"
                   if ok_micro else f"{'none':>19}  {'':>9}")
        gen_text = (f"{ok_gen[-1][0]:>24}  {ok_gen[-1][1]['generation']:>13.1f}" if ok_gen
                    else f"{'none':>24}  {'':>13}")
        print(f"{budget:>5}  {mb_text}  {gen_text}")
    t = plan_for_flags(m, cfg, micro_batch_size=1)["terms"]
    print(f"(at any batch size: weights + AdamW {t['state']:.1f} GB, gradients {t['grads']:.1f}, bf16 casts "
          f"{t['casts']:.1f}, reference {t['reference']:.1f}; --trainable_params shrinks the gradients and AdamW)")


# ---------------------------------------------------------------- --measure: train.py's run against the plan
def save_random_model(config: str, path: str) -> None:
    """A random-weight float32 model of `config` with Qwen2.5's tokenizer and generation config, saved with
    save_pretrained (in a child process, so that the measuring process never held it)."""
    from common import ARCHITECTURES
    from grpo.tiny import qwen_like_generation_config
    from qwen25_tokenizer import build_qwen25_tokenizer
    from transformers import Qwen2ForCausalLM
    tok = build_qwen25_tokenizer()
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    model_config = Qwen2Config(**ARCHITECTURES[config], tie_word_embeddings=True, rms_norm_eps=1e-6,
                               eos_token_id=im_end, pad_token_id=endoftext, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config)
    model.generation_config = qwen_like_generation_config(im_end, endoftext)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def return_freed_memory() -> None:
    """CPU: make glibc serve every allocation of 128 KiB or more with its own mmap, returned to the system when freed.
    By default the threshold rises with the largest block freed (up to 32 MiB), after which tensors of that size
    come from the heap, which keeps freed memory: the gradients freed by zero_grad then stayed in the RSS of the
    next phases (+2 GB in a 0.5B run). With a fixed threshold RSS follows the live tensors, as CUDA's
    max_memory_allocated does."""
    import ctypes
    M_MMAP_THRESHOLD = -3                                                    # glibc's mallopt parameter
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except OSError:
        print("not glibc: freed memory may stay in the RSS, and the measured peaks above the plan")


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def measure(m: Memory, train_args: list[str]) -> list[dict]:
    """train.main on the random-weight model; per step, the measured peak of each phase and the plan for that step's
    lengths. Phases are timed by wrapping train.py's generate_rollout, rollout_logprobs and policy_update."""
    import train
    from common import PeakMemory
    assert m.data, "--measure needs --data (a ToolRL-format file of prompts)"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = Memory(**{**m.__dict__, "device": device})
    if device == "cpu":
        return_freed_memory()
    work = Path(m.keep or tempfile.mkdtemp(prefix="grpo-memory-"))
    model_dir = work / f"{m.config}-random"
    if not (model_dir / "config.json").is_file():
        child = multiprocessing.get_context("spawn").Process(target=save_random_model, args=(m.config, str(model_dir)))
        child.start()
        child.join()
        assert child.exitcode == 0, "saving the random-weight model failed"
    argv = ["--model", str(model_dir), "--data", m.data, "--output_dir", str(work / "run"), "--overwrite_output_dir",
            "--eval_data", "none", "--max_steps", "2", *train_args]
    cfg = train.configure(argv)
    memory, steps, state = PeakMemory(device), [], {"baseline": None}

    def phase(name, fn):
        def wrapped(*args, **kwargs):
            memory.reset()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            peak = memory.read_gb()
            if name == "generation":
                steps.append(dict(rollout=result, peaks={}, seconds={}))
            record = steps[-1]
            if name == "update":                             # its two halves, read around AdamW's step below
                peak = max(peak, record["peaks"].get("backward", 0.0), record["peaks"].get("optimizer_step", 0.0))
            record["peaks"][name] = max(peak, record["peaks"].get(name, 0.0))
            record["seconds"][name] = record["seconds"].get(name, 0.0) + time.perf_counter() - t0
            print(f"[memory] step {len(steps)} {name}: peak {peak:.2f} GB, {time.perf_counter() - t0:.1f} s", flush=True)
            return result
        return wrapped

    def load_model(*args, **kwargs):
        if state["baseline"] is None:                        # the policy, train.py's first model
            state["baseline"] = rss_gb() if device == "cpu" else 0.0
        return real["load_model"](*args, **kwargs)

    def optimizer_step(self, *args, **kwargs):               # the update's backward ends where AdamW's step begins
        peaks = steps[-1]["peaks"]
        peaks["backward"] = max(memory.read_gb(), peaks.get("backward", 0.0))
        memory.reset()
        result = real_step(self, *args, **kwargs)
        peaks["optimizer_step"] = max(memory.read_gb(), peaks.get("optimizer_step", 0.0))
        memory.reset()
        return result

    real = {name: getattr(train, name) for name in ("generate_rollout", "rollout_logprobs", "policy_update",
                                                    "load_model")}
    real_step = torch.optim.AdamW.step
    torch.optim.AdamW.step = optimizer_step
    train.generate_rollout = phase("generation", real["generate_rollout"])
    train.rollout_logprobs = phase("logprobs", real["rollout_logprobs"])
    train.policy_update = phase("update", real["policy_update"])
    train.load_model = load_model
    try:
        train.main(argv)
    finally:
        for name, fn in real.items():
            setattr(train, name, fn)
        torch.optim.AdamW.step = real_step
    results = []
    for i, record in enumerate(steps):
        r = record.pop("rollout")
        T_len = r.completion_mask.shape[1]
        P = r.attention_mask[:, :-T_len].sum(1).tolist()
        T = r.completion_mask.sum(1).tolist()
        p = plan_for_flags(m, cfg, P=P, T=T, baseline_gb=state["baseline"])
        print(f"\n== step {i + 1}{' (no AdamW moments yet: the plan counts them)' if i == 0 else ''}: {len(P)} rows, "
              f"prompts {min(P)}..{max(P)} tokens, completions {min(T)}..{max(T)}; baseline {state['baseline']:.2f} GB")
        print_plan(p, record["peaks"])
        print(f"memory plan, update's halves: backward measured {record['peaks'].get('backward', 0):.2f} GB of "
              f"{p['backward']:.2f} planned; optimizer step measured {record['peaks'].get('optimizer_step', 0):.2f} "
              f"GB of {p['optimizer_step']:.2f} planned")
        results.append(dict(record, plan={k: p[k] for k in ("generation", "logprobs", "update", "backward",
                                                            "optimizer_step")},
                            terms=p["terms"], P=P, T=T))
    return results


def main(argv=None):
    from grpo.config import Config
    own, rest = split_args(sys.argv[1:] if argv is None else argv)
    m, _ = parse_config(Memory, own)
    if m.measure:
        return measure(m, rest)
    cfg, _ = parse_config(Config, rest)
    print(f"{m.config} on {m.device}, bf16 {cfg.bf16}: B={cfg.prompts_per_step} x G={cfg.num_generations}, prompts "
          f"{cfg.max_prompt_length} + completions {cfg.max_new_tokens} tokens, micro-batch {cfg.micro_batch_size}, "
          f"generation batch {cfg.generation_batch_size}, beta {cfg.beta}, checkpointing {cfg.gradient_checkpointing}"
          + (f", {m.trainable_params:,} trainable parameters" if m.trainable_params else ""))
    print_plan(plan_for_flags(m, cfg))
    fits(m, cfg)


if __name__ == "__main__":
    main()
