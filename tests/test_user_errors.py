"""Every user mistake stops with one line (exit code 2, no traceback) that names the flag, file or row, before
any model is loaded (issue 12, item 6). In-process, with the model loaders replaced by ones that fail the test,
so "before any model is loaded" is checked, not assumed; two cases also run as a real process."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import eval as eval_py
import train
from grpo import evaluation
from grpo import run
from grpo.cli import parse_config
from grpo.config import SMOLLM2_CPU_PRESET, TINY_PRESET

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the mistake was reported")
    for module in (train, eval_py, evaluation):
        for name in ("load_model", "load_tokenizer", "load_model_and_tokenizer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, loaded)


def one_line_error(capsys, run, prog="train.py") -> str:
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"{prog}: error: ")
    return line


def data_file(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def toolrl_rows(n: int) -> bytes:
    output = '<think> x </think>\n<tool_call>\n{"name": "a", "parameters": {}}\n</tool_call>'
    return json.dumps([{"instruction": "sys", "input": f"q{i}", "output": output} for i in range(n)]).encode()


BAD_FILES = {   # name, content, what the line must say
    "empty": ("empty.json", b"", "empty file"),
    "binary": ("model.json", bytes(range(256)) * 4, "not UTF-8"),
    "latin-1": ("latin.json", '[{"instruction": "café"}]'.encode("latin-1"), "not UTF-8"),
    "deep": ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "huge integer": ("huge.json", b'[{"instruction": ' + b"1" * 5000 + b"}]", "not valid JSON"),
    "deep jsonl": ("deep.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 1"),
    "no rows": ("none.jsonl", b"\n\n", "no rows"),
    "bad row": ("rows.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: ground truth"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_data_file(tmp_path, capsys, case):
    name, content, reason = BAD_FILES[case]
    path = data_file(tmp_path, name, content)
    line = one_line_error(capsys, lambda: train.main(["--data", path, "--output_dir", str(tmp_path / "run")]))
    assert f"--data {path}" in line and reason in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["--num_generations", "1"], "--num_generations must be >= 2 for group-relative advantages"),
    (["--prompts_per_step", "-3"], "--prompts_per_step must be positive, got -3"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be positive, got 0"),
    (["--temperature", "0"], "--temperature must be > 0 for sampling"),
    (["--learning_rate", "-1"], "--learning_rate must be >= 0, got -1.0"),
    (["--model", "NoSuchModelFamily-7B"], "--model 'NoSuchModelFamily-7B': not a local directory, not a hub id"),
    (["--data", "/no/such/file.json"], "--data /no/such/file.json: no data file at"),
    (["--data", "demo", "--data_split", "dev"], "--data_split dev: --data demo has the splits train, validation, test"),
    (["--data", "{file}", "--data_split", "test"], "holds one split already"),
    (["--data", "demo-sft"], "--data demo-sft: its targets are a teacher's, for --sft_data"),
    (["--data", "{file}", "--prompts_per_step", "8"], "--prompts_per_step 8 is more than the 3 prompts"),
    (["--learning_rate", "nan"], "argument --learning_rate: expected a finite number, got 'nan'"),
    (["--beta", "inf"], "argument --beta: expected a finite number, got 'inf'"),
    (["--max_grad_norm", "-1"], "--max_grad_norm must be > 0"),
    (["--entropy_coef", "-0.1"], "--entropy_coef must be >= 0"),
    (["--epsilon", "-0.2"], "--epsilon must be >= 0"),
    (["--cpu_threads", "100000"], "--cpu_threads 100000: this machine lets the run use"),
    (["--learn", "0.1"], "unrecognized arguments: --learn 0.1"),           # no abbreviations
    (["--model", "/no/such/model"], "--model /no/such/model: no such directory"),
    (["--sft_data", "/no/such.json"], "--sft_data /no/such.json: no data file at"),
    (["--eval_data", "/no/such.json"], "--eval_data /no/such.json: no data file at"),
    (["--top_entropy_quantile", "2"], "--top_entropy_quantile must be in [0, 1], got 2.0"),
    (["--reward_weights", "1,x"], "--reward_weights '1,x': 'x' is not a number"),
    (["--loss_type", "mean"], "argument --loss_type: invalid choice: 'mean'"),
    (["--eval_data", "validation", "--data_split", "validation"],
     "--eval_data validation: train on the rest of --data demo (--data_split train), not --data_split validation"),
])
def test_a_bad_flag(tmp_path, capsys, args, words):
    file = data_file(tmp_path, "rows.jsonl", b"".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}],
                    "ground_truth": '<tool_call>\n{"name": "a", "parameters": {}}\n</tool_call>'}).encode() + b"\n"
        for i in range(3)))
    args = [a.replace("{file}", file) for a in args]
    line = one_line_error(capsys, lambda: train.main(args + ["--output_dir", str(tmp_path / "run")]))
    assert words in line, line
    assert not (tmp_path / "run").exists()


def test_skip_bad_rows_is_a_flag_and_named_in_the_error(tmp_path, capsys):
    rows = json.loads(toolrl_rows(20))
    rows[4]["input"] = None
    path = data_file(tmp_path, "mine.json", json.dumps(rows).encode())
    line = one_line_error(capsys, lambda: train.main(["--data", path, "--output_dir", str(tmp_path / "run")]))
    assert "row 5: field 'input'" in line and "--skip_bad_rows" in line and "skip_bad_rows=True" not in line
    cfg = train.configure(["--data", path, "--skip_bad_rows", "--eval_data", path])
    examples, sft_examples, eval_items = run.load_data(cfg)
    assert len(examples) == 19 and sft_examples is examples    # --model tiny --data FILE: the warm start uses FILE
    assert len(eval_items) == 19                                # the held-out set too, read once, as eval.py reads it
    assert "row 5: field 'input'" in capsys.readouterr().out


def test_a_hub_model_while_offline_fails_in_seconds(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")        # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    line = one_line_error(capsys, lambda: train.main(["--model", "Qwen2.5-0.5B-Instruct", "--data", "demo"]))
    assert "--model Qwen2.5-0.5B-Instruct: Qwen/Qwen2.5-0.5B-Instruct is not in the local cache" in line
    line = one_line_error(capsys, lambda: eval_py.main(parse_config(eval_py.EvalConfig, [
        "--model", "Qwen2.5-0.5B-Instruct", "--benchmarks", "demo", "--output_dir", str(tmp_path)])[0]), "eval.py")
    assert "is not in the local cache" in line


def test_the_toolrl_download_while_offline(tmp_path, capsys, monkeypatch):
    import data.loaders
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.loaders, "TOOLRL_RAW", "http://127.0.0.1:9/")
    line = one_line_error(capsys, lambda: train.main(["--data", "toolrl", "--output_dir", str(tmp_path / "run")]))
    assert line.startswith("train.py: error: --data toolrl: could not download rlla_rl.json") and "--data PATH" in line
    # the held-out set too, before training rather than after it
    line = one_line_error(capsys, lambda: train.main(["--eval_data", "toolrl", "--output_dir", str(tmp_path / "run")]))
    assert line.startswith("train.py: error: --eval_data toolrl: could not download rlla_rl.json")


def test_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def run(*args):
        return lambda: eval_py.main(parse_config(eval_py.EvalConfig, [*args, "--output_dir", str(tmp_path)],
                                                 prog="eval.py")[0])
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)                      # bfcl-eval not installed
    line = one_line_error(capsys, run("--model", str(tmp_path), "--benchmarks", "bfcl"), "eval.py")
    assert "pip install --no-deps bfcl-eval" in line
    bad = data_file(tmp_path, "held.jsonl", b'{"messages": []}\n')
    line = one_line_error(capsys, run("--model", str(tmp_path), "--benchmarks", "toolrl", "--toolrl_data", bad),
                          "eval.py")
    assert f"{bad}: line 1" in line and "--skip_bad_rows" in line


def test_config_file_values_are_checked_and_flags_win(tmp_path, capsys):
    saved = tmp_path / "train_config.json"
    saved.write_text(json.dumps({"learning_rate": 0.5, "seed": 7, "resume": "old/run"}))
    cfg = train.configure(["--config", str(saved), "--seed", "3"])
    assert (cfg.learning_rate, cfg.seed, cfg.resume) == (0.5, 3, None)      # a saved --resume is not an order
    assert cfg.max_steps == TINY_PRESET["max_steps"]                    # the preset fills the rest
    for content, words in [({"learning_rat": 1.0}, "unknown key 'learning_rat'"),
                           ({"learning_rate": "fast"}, 'learning_rate = "fast" is not a valid --learning_rate'),
                           ({"reward_scale": "huge"}, 'reward_scale = "huge" is not a valid --reward_scale')]:
        saved.write_text(json.dumps(content))
        line = one_line_error(capsys, lambda: train.configure(["--config", str(saved)]))
        assert f"--config {saved}: {words}" in line, line


@pytest.mark.parametrize("args", [["--learning_rate", "-1"], ["--data", "/no/such.json"]])
def test_as_a_process_one_line_and_no_traceback(tmp_path, args):
    result = subprocess.run([sys.executable, "train.py", *args, "--output_dir", str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_smollm2_on_a_cpu_brings_its_preset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("grpo.config.resolve_model_name", lambda name: str(tmp_path))   # no model needed to check
    cfg = train.configure(["--model", "SmolLM2-135M-Instruct", "--sft_steps", "3"])
    assert (cfg.sft_steps, cfg.data, cfg.data_split, cfg.sft_data) == (3, "toolrl-sft", "fit", "toolrl-sft")
    assert cfg.max_new_tokens == SMOLLM2_CPU_PRESET["max_new_tokens"] and cfg.sft_placeholder_thought
    cfg = train.configure(["--model", "SmolLM2-135M-Instruct", "--data", "my/rlla_sft.json"])
    assert cfg.sft_data == "my/rlla_sft.json"                 # offline copy: warm start on its fit part too
    line = one_line_error(capsys, lambda: train.configure(["--model", "SmolLM2-135M-Instruct", "--eval_data",
                                                           "validation", "--data_split", "train"]))
    assert "--eval_data validation: train on the rest of --data toolrl-sft (--data_split fit)" in line
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)                # on a GPU: the paper's recipe
    assert train.configure(["--model", "SmolLM2-135M-Instruct"]).max_steps == 105
