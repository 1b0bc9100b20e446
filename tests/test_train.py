"""train.py end to end on the tiny model: learning, the demo command, resume after a kill, bad input."""
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_py
import train
from conftest import run_then_sigkill
from data import load_examples
from grpo import checkpoint as ckpt
from grpo import update
from grpo.logprobs import CompletionLogprobs
from grpo.model import bf16_autocast
from grpo.loss import group_advantages
from grpo.rollout import generate_rollout
from grpo.tiny import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
# A short run of the demo command: every phase (SFT, rollout, reward, update, checkpoint) in seconds.
SHORT = ["--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "12", "--sft_steps", "2",
         "--sft_batch_size", "4", "--save_every", "1", "--log_samples_every", "1"]


def no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("bf16", [False, True])
def test_learning_on_a_dense_reward(bf16):
    """Reward = fraction of completion tokens from the lower half of the vocabulary: starts near 0.5,
    must clearly rise within a few dozen GRPO steps of the real update code; under CPU bf16 autocast too
    (rollout and update, as train.py --bf16 true runs them)."""
    torch.manual_seed(0)
    tok = build_tokenizer(["hello world, the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    model = build_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    V = model.config.vocab_size
    never = V + 1  # no EOS can be sampled (id out of range), so every completion has 8 tokens
    cfg = replace(train.Config(), steps_per_generation=1, micro_batch_size=64, beta=0.0, entropy_coef=0.0,
                  max_grad_norm=1.0, temperature=1.0)
    policy = CompletionLogprobs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    prompts = [tok("hello")["input_ids"], tok("the fox")["input_ids"], tok("dog")["input_ids"], [5]]
    means = []
    for step in range(20):
        with bf16_autocast("cpu", bf16)():
            rollout = generate_rollout(model, prompts, num_generations=8, max_new_tokens=8, temperature=1.0,
                                       eos_ids=[never], pad_id=0, batch_size=32)
        rewards = (rollout.completion_ids < V // 2).float().mean(dim=1)                 # (N,)
        means.append(rewards.mean().item())
        model.train()
        update.policy_update(policy, optimizer, rollout, group_advantages(rewards, 8), None, None, cfg,
                            bf16_autocast("cpu", bf16))
    first, last = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert last > first + 0.3, f"mean reward went from {first:.2f} to {last:.2f}"   # seen: 0.51 -> 1.00 (float32)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One uninterrupted 4-step run of the demo command, shared by the tests below."""
    out = tmp_path_factory.mktemp("demo_run")
    train.main(["--output_dir", str(out), "--max_steps", "4"] + SHORT)
    return out


def test_demo_command_end_to_end(demo_run):
    from transformers import AutoModelForCausalLM
    rows = read_metrics(demo_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/format", "rewards/correctness", "frac_reward_zero_std",
                "completion_length", "clipped_ratio", "kl", "entropy", "loss", "grad_norm", "learning_rate",
                "time/generate", "time/score", "time/update", "time/step", "tokens_per_second"):
        assert key in rows[0], key
    saved = json.loads((demo_run / "train_config.json").read_text())
    assert saved["data"] == "demo" and saved["sft_data"] == "demo-sft" and saved["max_steps"] == 4
    final = demo_run / "checkpoint-000004"
    assert AutoModelForCausalLM.from_pretrained(final) is not None
    assert json.loads((final / "train_config.json").read_text()) == saved
    samples = [json.loads(line) for line in (demo_run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) >= 4
    users = {e.messages[-1]["content"] for e in load_examples("demo", split="train")}
    assert all(row["request"] in users for row in samples)           # what was asked, beside the completion
    assert [p.name for p in ckpt.list_checkpoints(demo_run)] == ["checkpoint-000004", "checkpoint-000003"]  # keep 2
    assert (demo_run / "reward_curves.png").stat().st_size > 0


def test_end_of_run_table_is_what_eval_py_reports(demo_run, tmp_path):
    # the run compared the untrained, warm-start and final models on the demo's held-out test split;
    # eval.py on the same three directories, with the run's generation length, gives the same numbers
    models = [str(demo_run / name) for name in ("tiny-init", "sft-init", "checkpoint-000004")]
    in_run = json.loads((demo_run / "eval" / "summary.json").read_text())["results"]
    assert list(in_run) == models
    ours = eval_py.main(eval_py.EvalConfig(model=models, benchmarks="demo", output_dir=str(tmp_path),
                                           max_new_tokens=12, max_prompt_tokens=512, device="cpu"))
    assert ours == in_run
    assert ours[models[0]]["demo"]["num_items"] == 100


def test_a_bare_demo_run_is_put_beside_the_demos_spread_over_seeds():
    """The end-of-run line says whether the run is typical, for the demo's own recipe only (any seed, threads or
    paths); a changed recipe gets no range."""
    from grpo.config import DEMO_SPREAD, configure, demo_spread
    from grpo.report import spread_line
    assert demo_spread(configure(["--seed", "3", "--cpu_threads", "1", "--output_dir", "x", "--shared_prompt",
                                  "false"])) == DEMO_SPREAD
    assert demo_spread(configure(["--sft_steps", "10"])) is None
    assert demo_spread(configure(["--max_steps", "4"])) is None
    (warm_lo, warm_hi), (final_lo, final_hi) = DEMO_SPREAD["warm start"], DEMO_SPREAD["GRPO"]
    line = spread_line({"untrained (tiny-init)": 0.0, "warm start (sft-init)": warm_lo / 100,
                        "GRPO (checkpoint-000030)": (final_hi + 1) / 100}, DEMO_SPREAD)
    assert f"GRPO {final_lo:.1f}-{final_hi:.1f}" in line
    assert f"warm start {warm_lo:.1f}" + (f"-{warm_hi:.1f}" if warm_hi > warm_lo else " on every seed,") in line
    assert "warm start 0.0 on every seed, GRPO 1.0-2.0" in spread_line({"warm start": 0.0, "GRPO": 0.015},
                                                                       {"warm start": (0, 0), "GRPO": (1, 2)})
    assert line.endswith(f"warm start {warm_lo:.1f}, GRPO {final_hi + 1:.1f} (outside that range)")


def test_lr_factor_warmup_then_decay():
    # warm-up 0, 1/2 over two steps; then cosine 1 -> 0 over the remaining four: cos(pi * k / 4)
    assert [update.lr_factor("cosine", 2, 6, s) for s in range(7)] == pytest.approx(
        [0, 0.5, 1.0, 0.5 * (1 + 2 ** -0.5), 0.5, 0.5 * (1 - 2 ** -0.5), 0.0])
    assert [update.lr_factor("linear", 0, 4, s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert [update.lr_factor("constant", 1, 4, s) for s in range(3)] == [0.0, 1.0, 1.0]


def test_sft_control_runs_for_the_grpo_time(demo_run, capsys):
    import sft_control
    sft_control.main([str(demo_run)])
    printed = capsys.readouterr().out
    assert "4 GRPO steps took" in printed and "more supervised steps took" in printed
    summary = json.loads((demo_run / "sft-control-eval" / "summary.json").read_text())["results"]
    assert list(summary)[-1] == str(demo_run / "sft-control") and len(summary) == 4
    sft_control.main([str(demo_run), "--sft_data", "demo"])      # the gold calls instead of the teacher's
    summary = json.loads((demo_run / "sft-control-demo-eval" / "summary.json").read_text())["results"]
    assert list(summary)[-1] == str(demo_run / "sft-control-demo")
    assert "SFT steps on demo-sft" in capsys.readouterr().out


def test_pass_at_k_compares_greedy_with_samples(demo_run, capsys):
    import pass_at_k
    pass_at_k.main([str(demo_run / "sft-init"), "--k", "2", "--temperatures", "1.0", "--max_new_tokens", "12"])
    printed = capsys.readouterr().out
    assert "82 prompts that call tools" in printed and "greedy exact match" in printed and "pass@2" in printed


def test_sigkill_mid_run_then_resume_equals_uninterrupted(demo_run, tmp_path):
    """Kill the process with SIGKILL while it trains (whatever it is doing at that moment), resume with
    --resume, and compare with the uninterrupted run: same weights, same metrics."""
    args = ["--max_steps", "4"] + SHORT
    run_then_sigkill(["--output_dir", str(tmp_path)] + args, when=tmp_path / "checkpoint-000002")
    train.main(["--output_dir", str(tmp_path), "--resume", str(tmp_path)] + args)
    a, b = weights(demo_run / "checkpoint-000004"), weights(tmp_path / "checkpoint-000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert [r["reward"] for r in read_metrics(tmp_path)] == [r["reward"] for r in read_metrics(demo_run)]


def test_partial_and_corrupt_checkpoints_are_skipped(demo_run, tmp_path, capsys):
    good = tmp_path / "checkpoint-000004"
    good.mkdir()
    for f in (demo_run / "checkpoint-000004").iterdir():
        (good / f.name).write_bytes(f.read_bytes())
    (tmp_path / ".tmp-checkpoint-000005").mkdir()                      # killed mid-write: never renamed
    corrupt = tmp_path / "checkpoint-000006"
    corrupt.mkdir()
    for f in good.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:len(data) // 2])  # truncated
    found, state = ckpt.find_resumable(tmp_path)
    assert found == good and state["step"] == 4
    assert "skipping unusable checkpoint" in capsys.readouterr().out


def test_prompt_that_leaves_no_room_for_completions(tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        train.configure(["--model", str(tiny_model_dir), "--data", "demo", "--max_prompt_length", "32760",
                         "--max_new_tokens", "1024"])
    assert "no room for completion tokens" in capsys.readouterr().err


def test_help_shows_the_tiny_preset_beside_the_papers_recipe(capsys):
    with pytest.raises(SystemExit) as e:
        train.configure(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "(default: 16 (the tiny preset); SmolLM2-135M-Instruct on a CPU: 4; paper's recipe: 512)" in text
    assert ("(default: 0.0002 (the tiny preset); SmolLM2-135M-Instruct on a CPU: 1e-05; paper's recipe: 1e-06)"
            in text)                                                              # --learning_rate
    assert "(default: False; SmolLM2-135M-Instruct on a CPU: True)" in text       # --sft_placeholder_thought


def nan_reward(completion, ground_truth, step, config):
    return {"format": float("nan"), "correctness": float("nan"), "total": float("nan")}


def test_non_finite_steps_are_skipped_then_abort(tmp_path):
    """NaN rewards make the loss and gradient non-finite: each such step is skipped (weights untouched),
    and after --max_bad_steps in a row the run stops with a message, its checkpoint saved."""
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--max_steps", "8", "--max_bad_steps", "2",
                    "--reward_fn", f"{__name__}:nan_reward"] + SHORT)
    assert "non-finite" in str(e.value)
    assert [r["skipped"] for r in read_metrics(tmp_path)] == [2, 2]     # both optimizer steps of each rollout
    start = weights(tmp_path / "sft-init")
    saved = weights(tmp_path / "checkpoint-000002")
    assert all(torch.equal(start[k], saved[k]) for k in start)          # skipped steps changed nothing


def test_lr_1e30_stops_without_saving_the_broken_weights(tmp_path):
    """lr 1e30: the first optimizer step makes the weights useless (finite but huge: NaN losses, then NaN/inf
    logits while sampling, which used to crash inside torch.multinomial). The run stops, saving nothing."""
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--max_steps", "8", "--max_bad_steps", "2",
                    "--learning_rate", "1e30", "--eval_data", "none"] + SHORT)
    message = str(e.value)
    assert "the weights themselves give NaN/inf, so they were not saved" in message
    assert f"the last good ones are in {tmp_path / 'sft-init'}" in message and "--learning_rate (now 1e+30)" in message
    assert not ckpt.list_checkpoints(tmp_path)


def test_a_non_finite_warm_start_stops_before_writing_sft_init(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--max_bad_steps", "2", "--eval_data", "none", *SHORT,
                    "--sft_steps", "8", "--sft_learning_rate", "1e30"])
    assert "aborting the warm start" in str(e.value) and "--sft_learning_rate" in str(e.value)
    assert not (tmp_path / "sft-init").exists()


def test_a_schedule_resumes_bit_identically(tmp_path):
    """Cosine with warm-up over 4 steps; a run resumed from its step-2 checkpoint ends with the same weights
    and the same per-step learning rates as the uninterrupted run."""
    args = ["--max_steps", "4", "--lr_scheduler_type", "cosine", "--warmup_steps", "1", "--keep_checkpoints", "4",
            "--eval_data", "none"] + SHORT
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train.main(["--output_dir", str(whole)] + args)
    shutil.copytree(whole, cut)
    for step in (3, 4):
        shutil.rmtree(cut / f"checkpoint-00000{step}")
    train.main(["--output_dir", str(cut), "--resume", str(cut)] + args)
    a, b = weights(whole / "checkpoint-000004"), weights(cut / "checkpoint-000004")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rates = [r["learning_rate"] for r in read_metrics(whole)]
    assert rates == [r["learning_rate"] for r in read_metrics(cut)]
    assert rates[0] == 0 and rates[1] == max(rates) and rates[1] > rates[2] > rates[3] > 0


def test_a_resume_with_a_new_learning_rate_is_refused_then_allowed_and_in_effect(demo_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(demo_run, out)
    args = ["--output_dir", str(out), "--resume", str(out), "--max_steps", "5", "--learning_rate", "0.01",
            "--eval_data", "none"] + SHORT
    before = snapshot(out)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--learning_rate 0.01 where checkpoint-000004 has 0.0002" in line
    assert "--allow_config_change" in line and snapshot(out) == before
    train.main(args + ["--allow_config_change"])
    last = read_metrics(out)[-1]
    assert last["step"] == 5 and last["learning_rate"] == 0.01
    assert last["config_change"] == {"learning_rate": [0.0002, 0.01]}
    state = torch.load(out / "checkpoint-000005" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.01


# ---------------------------------------------------------------- never lose a run (issue 12)

def snapshot(directory: Path) -> dict:
    """Every file under `directory`: its bytes and mtime; and every directory's name."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_a_fresh_run_into_a_finished_run_changes_nothing(demo_run, capsys):
    before = snapshot(demo_run)
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(demo_run), "--max_steps", "2"] + SHORT)
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train.py: error: ") and f"--resume {demo_run}" in line and "--overwrite_output_dir" in line
    assert snapshot(demo_run) == before


def test_overwrite_output_dir_deletes_the_old_run_and_pruning_keeps_the_new_checkpoint(demo_run, tmp_path):
    """A 4-step run lives in the directory (checkpoints 3 and 4); a 2-step run with --overwrite_output_dir
    replaces it. Pruning by step number alone would have kept 4 and 3 and deleted the new run's 2 and 1."""
    out = tmp_path / "run"
    shutil.copytree(demo_run, out)
    train.main(["--output_dir", str(out), "--max_steps", "2", "--overwrite_output_dir", "--eval_data", "none"] + SHORT)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-000002", "checkpoint-000001"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 2
    assert not (out / "eval").exists()                                  # the old run's evaluation went with it


def test_ctrl_c_ends_with_one_line_that_says_how_to_continue(tmp_path):
    # far more steps than the test waits for: on a loaded machine the run cannot finish before the signal comes
    cmd = [sys.executable, str(REPO / "train.py"), "--output_dir", str(tmp_path), "--max_steps", "100000",
           "--cpu_threads", "1", "--eval_data", "none"] + SHORT
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    # any checkpoint (the first is pruned two saves later: a loaded machine may not look in time)
    while not list(tmp_path.glob("checkpoint-0*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "--resume" in line]
    assert line.startswith("interrupted at step ")
    assert "/100000; newest checkpoint: " + str(tmp_path / "checkpoint-") in line
    assert line.endswith(f"--eval_data none {' '.join(SHORT)} --resume {tmp_path}")
    assert not list(tmp_path.glob(".tmp-*"))


def test_variants_bench_reruns_grpo_from_the_warm_start_with_extra_flags(demo_run, tmp_path, capsys):
    import variants
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    variants.main([str(run), "--only", "grpo", "--", "--max_steps", "1"])
    out = run / "variants" / "grpo"
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["loss_type"], saved["max_steps"], saved["sft_steps"]) == ("grpo", 1, 0)
    assert saved["model"] == str(run / "sft-init")
    assert capsys.readouterr().out.splitlines()[-1].startswith("| grpo | `--loss_type grpo` | ")
    with pytest.raises(SystemExit, match="unknown variant"):
        variants.main([str(run), "--only", "nope"])


def test_report_redraws_any_run(demo_run):
    result = subprocess.run([sys.executable, "-m", "grpo.report", str(demo_run)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(demo_run / "reward_curves.png")
    from grpo.report import heldout_exact_match
    assert list(heldout_exact_match(demo_run)) == ["tiny-init", "sft-init", "checkpoint-000004"]
