"""bench/gpu_quick.py, the 15-minute GPU check, on the CPU: its dry run end to end, what a phase cut off by its time
limit still leaves, and which carried wheels it installs."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_quick  # noqa: E402


def test_dry_run_saves_each_phase_and_the_table(tmp_path):
    """The dry run (tiny model, CPU) of every phase but compile (30 s of CPU compiling; its parsing is tested below):
    one JSONL record per phase with its status and numbers, and the markdown table."""
    code = gpu_quick.main(["--dry_run", "--out", str(tmp_path), "--phases", "facts,ours,cuda_tests,trl"])
    records = {r["phase"]: r for r in map(json.loads, (tmp_path / "gpu_quick.jsonl").read_text().splitlines())}
    assert list(records) == ["setup", *gpu_quick.PHASES] and code == 0
    assert {r["status"] for r in records.values()} <= {"ok", "skipped"}
    assert records["compile"]["reason"] == "not in --phases"
    facts = records["facts"]["result"]
    assert facts["cuda_available"] is False and facts["matmul"]["tflops"] > 0 and facts["copy_gbs"] > 0
    ours = records["ours"]["result"]
    assert set(ours["phases"]) == {"generation", "reward", "logprobs", "update"} and len(ours["step_phases"]) == 2
    assert ours["step_time"] > 0 and 0 < ours["mfu"] and ours["generation_fraction"] > 0
    assert ours["memory_plan"]["peak"] > 0 and ours["prompt_tokens"]["max"] == 48     # real lengths, cut at 48
    assert "--prompt_lengths bench/toolrl_prompt_lengths.json" in records["ours"]["command"]
    tests = records["cuda_tests"]["result"]["tests"]
    assert len(tests) == 4 and set(tests.values()) == {"SKIPPED"}                       # no GPU here
    assert records["trl"]["status"] == ("skipped" if records["setup"]["result"]["trl_unmet"] else "ok")
    table = (tmp_path / "gpu_quick.md").read_text()
    assert "| phase | status | wall s | result |" in table and "| step |" in table
    assert all(f"| {name} |" in table for name in records)
    assert "[gpu_quick] ours: ok" in (tmp_path / "gpu_quick.log").read_text()


def test_a_phase_past_its_limit_is_killed_and_keeps_its_finished_steps(tmp_path):
    """The time limit kills the phase's whole process group; the step lines it printed become its partial result."""
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"   # a child, as compile has
              "print('step 1/3 (warm-up): generation 1.50s  reward 0.01s  update 2.00s', flush=True)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        status, code, output = gpu_quick.run_logged([sys.executable, "-c", script], 3, {}, log)
    assert status == "timeout" and code == -9
    assert time.monotonic() - start < 8          # the child holding the output pipe died too: no 10 s wait for it
    result = gpu_quick.parse_result("ours", tmp_path, output, {})
    assert result == {"partial_steps": [dict(step=1, of=3, warmup=True,
                                             time={"generation": 1.5, "reward": 0.01, "update": 2.0})]}
    record = dict(phase="ours", status=status, reason="killed after 3s (limit)", result=result)
    assert gpu_quick.summary("ours", record) == ("killed after 3s (limit); step 1: generation 1.50s, reward 0.01s, "
                                                 "update 2.00s")


def test_trl_and_compile_are_read_against_our_step(tmp_path):
    """The TRL phase's ratio is our step time over TRL's; the compile phase's speed-up is our eager generation time
    over the compiled one (both medians of their measured steps)."""
    records = {"ours": {"status": "ok", "result": {"step_time": 20.0, "phases": {"generation": 12.0}}},
               "facts": {"result": {"cuda_available": True, "matmul": {"tflops": 800.0}}}}
    (tmp_path / "trl.json").write_text(json.dumps({"step_time": 50.0, "peak_gb": 40.0}))
    assert gpu_quick.parse_result("trl", tmp_path, "", records)["ours_over_trl"] == 0.4
    compiled = {"phases": {"generation": 4.0}, "step_phases": [{"generation": 4.5}, {"generation": 3.5}],
                "generation_fraction": 0.3, "mfu": None, "peak_flops": 989e12}
    (tmp_path / "compile.json").write_text(json.dumps(compiled))
    result = gpu_quick.parse_result("compile", tmp_path, "", records)
    assert result["eager_generation"] == 12.0 and result["speedup"] == 3.0
    assert gpu_quick.summary("compile", dict(status="ok", result=result)) == (
        "generation 4.00s compiled (measured steps: 4.50, 3.50), 0.300 of the decode limit vs 12.00s eager: 3.00x")


def test_carried_wheels_install_only_what_is_missing_or_older(tmp_path):
    for name in ("transformers-5.24.0-py3-none-any.whl", "trl-1.16.0-py3-none-any.whl",
                 "multiprocess-0.70.19-py312-none-any.whl", "datasets-5.2.0-py3-none-any.whl"):
        (tmp_path / name).touch()
    versions = {"transformers": "5.17.0", "trl": None, "multiprocess": "0.70.19", "datasets": "5.3.1"}
    chosen = [w.name.split("-")[0] for w in gpu_quick.wheels_to_install(tmp_path, versions)]
    assert chosen == ["transformers", "trl"]                         # same or newer already there: left alone
    assert gpu_quick.unmet({"transformers": "5.17.0", "torch": "2.11.0+cu130", "tqdm": None},
                           {"transformers": "5.24", "torch": "2.6", "tqdm": "0"}) == {"transformers": "5.17.0",
                                                                                    "tqdm": None}
