"""torchrun data parallelism on CPU (gloo, 2 processes, the tiny model): DDP and FSDP2 give exactly the
single-process gradient of the whole batch; train.py runs under torchrun; checkpoints move between rank counts."""
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import train
from grpo import dist, update
from grpo.logprobs import CompletionLogprobs
from grpo.model import load_model, set_checkpointing
from grpo.rollout import Rollout, generate_rollout

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
# One optimizer step in two micro-batches per rank, with every loss term on: the parts that need communication.
# The gradient norm is 2.3: clipping to 1 must use the norm of the whole gradient, not of a rank's shard.
CFG = replace(train.Config(), steps_per_generation=1, micro_batch_size=2, max_grad_norm=1.0, beta=0.1,
              entropy_coef=0.01)
# One thread: the ranks are forked, and a forked process must not start a new OpenMP pool of several threads
# (GNU OpenMP deadlocks); no held-out evaluation at the end (test_train checks it).
SHORT = ["--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "8", "--sft_steps", "1",
         "--sft_batch_size", "2", "--save_every", "1", "--log_samples_every", "1", "--cpu_threads", "1",
         "--eval_data", "none"]


def no_autocast():
    return torch.autocast("cpu", enabled=False)


def fixed_batch(vocab: int, P: int = 7, T: int = 6):
    """The same 8-row rollout, advantages and reference log-probs in every process. Completion lengths differ
    between the two halves (19 tokens vs 9), so a rank-local token count would give a different gradient."""
    g = torch.Generator().manual_seed(0)
    lengths = [6, 5, 6, 2, 1, 2, 1, 5]
    ids = torch.randint(3, vocab, (8, P + T), generator=g)
    comp = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]                # (8, T)
    attn = torch.cat([torch.ones(8, P, dtype=torch.long), comp.long()], 1)
    attn[::3, :2] = 0                                                                # some left padding
    advantages = torch.linspace(-1, 1, 8)
    ref_logp = (-7.4 + 0.3 * torch.randn(8, T, generator=g)) * comp                # near log(1/V): KL is not 0
    return Rollout(ids, attn, comp, ~comp.all(1)), advantages, ref_logp


def rows(rollout: Rollout, r: slice) -> Rollout:
    return Rollout(rollout.input_ids[r], rollout.attention_mask[r], rollout.completion_mask[r], rollout.truncated[r])


def one_step(model_dir, fsdp: bool, share: slice):
    """One optimizer step of update.policy_update on rows `share` of the fixed batch, with gradient checkpointing
    (the paper recipe's setting: recomputation must compose with the DDP/FSDP hooks). SGD(lr=1, momentum) moves
    the weights by exactly -grad on its first step and keeps that (clipped) gradient as optimizer state."""
    model = load_model(str(model_dir)).train()
    set_checkpointing(model, True)
    policy = dist.wrap(CompletionLogprobs(model), fsdp)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    rollout, advantages, ref_logp = fixed_batch(model.config.vocab_size)
    stats = update.policy_update(policy, optimizer, rows(rollout, share), advantages[share], None, ref_logp[share],
                                CFG, no_autocast)
    return model, optimizer, stats


def run_ranks(nprocs: int, fn, *args):
    """fn(*args) in `nprocs` processes set up as torchrun sets them up (RANK, WORLD_SIZE, ... ; gloo on CPU).
    Forked rather than spawned, so they start with this process's imports: seconds instead of tens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_as_rank, args=(nprocs, port, fn, args), nprocs=nprocs, start_method="fork")


def _as_rank(rank: int, nprocs: int, port: int, fn, args):
    torch.set_num_threads(1)                          # as torchrun's OMP_NUM_THREADS=1, and safe after a fork
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.setup()
    fn(*args)
    dist.barrier()
    torch.distributed.destroy_process_group()


def _fsdp_generation(model_dir: str):
    """Ranks generate different numbers of tokens, so no forward may wait on a collective; from whole weights,
    the same tokens as the unsharded model; sharded again afterwards."""
    model = load_model(model_dir)
    policy = dist.wrap(CompletionLogprobs(load_model(model_dir)), fsdp=True)
    never = model.config.vocab_size + 1                                             # no EOS: every row runs full
    kwargs = dict(num_generations=2, max_new_tokens=3 + 6 * dist.rank(), temperature=1.0, eos_ids=[never],
                  pad_id=0, batch_size=4)
    torch.manual_seed(dist.rank())
    expected = generate_rollout(model, [[5, 6, 7], [8, 9]], **kwargs)
    torch.manual_seed(dist.rank())
    with dist.full_weights(policy):
        got = generate_rollout(policy.model, [[5, 6, 7], [8, 9]], **kwargs)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert all(isinstance(p, DTensor) for p in policy.parameters())


def _two_rank_steps(model_dir: str, single_optimizer: dict, out_path: str):
    _fsdp_generation(model_dir)
    share = slice(dist.rank() * 4, (dist.rank() + 1) * 4)          # this rank's 2 prompts x 2 completions
    results = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        model, optimizer, _ = one_step(model_dir, fsdp, share)
        results[name] = dist.full_state_dicts(model, optimizer)
    # 1 -> 2 ranks: the single-process optimizer state, loaded into a sharded optimizer and gathered back.
    model = load_model(model_dir)
    dist.wrap(CompletionLogprobs(model), fsdp=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    dist.load_optimizer_state(model, optimizer, single_optimizer)
    results["fsdp_loaded"] = dist.full_state_dicts(model, optimizer)
    if dist.rank() == 0:
        torch.save(results, out_path)


def assert_state_close(got: dict, expected: dict, atol: float):
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=atol, msg=k)


def test_two_ranks_step_equals_one_process_step(tiny_model_dir, tmp_path):
    """DDP and FSDP2 on 2 ranks, each with half the rows, against 1 process with all of them: the same weights
    after one step, so the same gradient (global token count, x world size, no_sync, sharded reduction)."""
    model, optimizer, stats = one_step(tiny_model_dir, fsdp=False, share=slice(0, 8))
    assert stats["grad_norm"] > 2 * CFG.max_grad_norm                                  # clipping is active
    single_model, single_optim = dist.full_state_dicts(model, optimizer)
    run_ranks(WORLD, _two_rank_steps, str(tiny_model_dir), single_optim, str(tmp_path / "out.pt"))
    results = torch.load(tmp_path / "out.pt", weights_only=True)
    start = load_model(str(tiny_model_dir)).state_dict()
    assert max((single_model[k] - start[k]).abs().max() for k in single_model) > 1e-2  # the step moved weights
    for name in ("ddp", "fsdp"):
        got_model, got_optim = results[name]
        # summation order differs (micro-batches, then ranks): ~1e-8 apart on updates up to ~0.1
        assert_state_close(got_model, single_model, atol=1e-6)
        for k, state in single_optim["state"].items():
            assert_state_close(got_optim["state"][k], state, atol=1e-6)
    _, loaded = results["fsdp_loaded"]
    for k, state in single_optim["state"].items():                                     # exact round trip
        assert_state_close(loaded["state"][k], state, atol=0)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_torchrun_ddp_run(tmp_path):
    """The real launcher, as a user runs it: 2 ranks, DDP, 2 steps, evaluating 4 held-out rows at step 2."""
    from transformers import AutoModelForCausalLM
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(REPO / "train.py"), "--output_dir", str(tmp_path), "--max_steps", "2", *SHORT, "--eval_data", "demo",
           "--eval_every", "2", "--eval_limit", "4", "--report_to", "tensorboard"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step     1/2") == 1                                    # rank 0 alone logs
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "eval/exact_match" in read_metrics(tmp_path)[1]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone reports
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-000002") is not None


def test_fsdp_run_then_resume_in_one_process(tmp_path):
    """FSDP2 on 2 ranks saves whole tensors (not its shards), and one process resumes from them."""
    from transformers import AutoModelForCausalLM
    run_ranks(WORLD, train.main, ["--output_dir", str(tmp_path), "--max_steps", "1", "--fsdp"] + SHORT +
              ["--eval_data", "demo", "--eval_every", "1", "--eval_limit", "4"])   # evaluating on gathered weights
    checkpoint = tmp_path / "checkpoint-000001"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert load_file(checkpoint / "model.safetensors").keys() == dict(model.named_parameters()).keys()  # tied: once
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert {k: v["exp_avg"].shape for k, v in state.items()} == {k: p.shape for k, p in model.named_parameters()}
    train.main(["--output_dir", str(tmp_path), "--resume", str(tmp_path), "--max_steps", "2"] + SHORT)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "eval/exact_match" in read_metrics(tmp_path)[0]


def test_one_rank_equals_plain_run(tmp_path):
    """`torchrun --nproc_per_node 1` (DDP over one rank) reproduces a plain run: metrics and weights."""
    args = ["--max_steps", "2", "--beta", "0.1", "--entropy_coef", "0.01"] + SHORT      # every loss term on
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # as the ranked run: CPU kernels sum in a thread-count order
    try:
        train.main(["--output_dir", str(tmp_path / "plain")] + args)
    finally:
        torch.set_num_threads(threads)
    run_ranks(1, train.main, ["--output_dir", str(tmp_path / "ranked")] + args)
    drop = ("time/", "tokens_per_second")
    plain, ranked = ([{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_metrics(tmp_path / d)]
                     for d in ("plain", "ranked"))
    assert plain[1]["grad_norm"] > 0 and plain[1]["kl"] > 0                             # the step did something
    assert ranked == plain
    a, b = (load_file(tmp_path / d / "checkpoint-000002" / "model.safetensors") for d in ("plain", "ranked"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,flag", [
    (["--prompts_per_step", "3"], "--prompts_per_step"),
    (["--prompts_per_step", "2", "--num_generations", "3", "--steps_per_generation", "2"], "--steps_per_generation"),
])
def test_prompts_must_split_over_ranks(monkeypatch, capsys, args, flag):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train.configure(args)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_fsdp_needs_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e:
        train.configure(["--fsdp"])
    assert e.value.code == 2 and "torchrun" in capsys.readouterr().err
