"""The 15-minute GPU check: the GPU numbers docs/PERFORMANCE.md still lacks, most important first, each saved the
moment it exists, in at most 8 minutes on one H100 or H200 (bench/gpu.sh is the hour-long study).

    bash bench/gpu_quick.sh                  # the GPU machine: checks torch, then runs this script
    python bench/gpu_quick.py --dry_run      # any machine: the same phases at a tiny size on the CPU (about 1 min)

Phases, in this order, each a fresh process with its own time limit inside --budget_s: one that hangs is killed
and recorded as such, and the next still runs while time is left (`--phases ours,compile` reruns a few).

0. setup       which packages import, at which version; wheels carried in .whl/ (bench/gpu_wheels.sh) installed
               for what is missing or too old (the GPU machine reaches no package index)
1. facts       nvidia-smi, versions, a measured bf16 matmul (FLOP/s) and copy bandwidth
2. ours        3 steps (1 warm-up + 2 measured) of bench_grpo.py, which runs train.py's rollout, reward and update
               functions: Qwen2.5-1.5B with random weights, 16 prompts x G = 8, ToolRL's prompt lengths
               (bench/toolrl_prompt_lengths.json, cut at 2,048), 512 new tokens, every completion full length.
               Step time by phase, update MFU, generation's fraction of the decode limit, peak memory against
               bench_grpo.memory_plan
3. cuda_tests  pytest -m cuda tests/test_cuda.py
4. trl         TRL's GRPOTrainer on the same workload, 2 steps (1 warm-up + 1 measured): the ratio of step times
5. compile     generation alone with --compile_generation, 3 steps, against phase 2's eager generation

Under --out: gpu_quick.jsonl (one JSON object per phase, appended when the phase ends), gpu_quick.md (the tables
for docs/PERFORMANCE.md, rewritten after every phase) and gpu_quick.log (everything the phases printed).
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from grpo.cli import field, parse_config  # noqa: E402

BENCH = str(REPO / "bench" / "bench_grpo.py")
LENGTHS = "bench/toolrl_prompt_lengths.json"
WORKLOADS = {   # bench_grpo.py flags shared by phases 2, 4 and 5
    "gpu": ["--config", "qwen2.5-1.5b", "--prompts", "16", "--num_generations", "8", "--prompt_lengths", LENGTHS,
            "--prompt_tokens", "2048", "--completion_tokens", "512"],
    "dry": ["--config", "tiny", "--prompts", "2", "--num_generations", "4", "--prompt_lengths", LENGTHS,
            "--prompt_tokens", "48", "--completion_tokens", "8", "--micro_batch_size", "4", "--threads", "1"],
}
# phase: (at most, at least) seconds on the GPU; a phase is skipped when less than its minimum is left
LIMITS = {"facts": (60, 10), "ours": (240, 90), "cuda_tests": (150, 45), "trl": (180, 90), "compile": (240, 90)}
PHASES = list(LIMITS)
# what the phases import, with the lowest version that works (transformers 5.24: `cache=` in generate/forward)
REQUIRED = {"torch": "2.6", "transformers": "5.24", "safetensors": "0", "numpy": "0", "tqdm": "0", "pytest": "0"}
FOR_TRL = {"trl": "0", "datasets": "0"}
SITE = Path(tempfile.gettempdir()) / "gpu_quick_site"          # where carried wheels are installed


@dataclass
class Quick:
    """The 15-minute GPU check: setup, facts, ours, CUDA tests, TRL, compiled generation; results saved as they come."""
    out: str = field("bench/gpu_out", "folder for gpu_quick.jsonl, gpu_quick.md and gpu_quick.log")
    budget_s: float = field(460.0, "seconds for every phase together; each gets at most what is left")
    dry_run: bool = field(False, "the same phases at a tiny size on the CPU (--config tiny), to test this script")
    phases: str = field(",".join(PHASES), f"comma-separated phases to run, always in the order {', '.join(PHASES)}")
    wheels: str = field(".whl", "folder of wheels to install from when a package is missing or too old (not in a "
                                "dry run)")
    facts_json: str | None = field(None, "internal: measure the facts in this process and write them here")


# ---------------------------------------------------------------- setup: packages and carried wheels
def version_tuple(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); enough to compare release numbers."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def installed_versions(names, env: dict) -> dict:
    """name -> version string, or None when not installed, as a fresh process with `env` sees them."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n"
            "    try:\n        return m.version(n)\n    except m.PackageNotFoundError:\n        return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    out = subprocess.run([sys.executable, "-c", code, *names], env=env, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def unmet(versions: dict, needs: dict) -> dict:
    """The packages of `needs` that are missing or older than needed: name -> what is there (None or a version)."""
    return {n: versions.get(n) for n, low in needs.items()
            if versions.get(n) is None or version_tuple(versions[n]) < version_tuple(low)}


def wheels_to_install(wheel_dir: Path, versions: dict) -> list[Path]:
    """The wheels in `wheel_dir` whose package is missing or older than the wheel (never a downgrade)."""
    chosen = []
    for wheel in sorted(Path(wheel_dir).glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        have = versions.get(name.lower().replace("_", "-"))
        if have is None or version_tuple(have) < version_tuple(version):
            chosen.append(wheel)
    return chosen


def setup(cfg: Quick, env: dict, say) -> dict:
    """Install carried wheels (one at a time, so one that does not fit this Python leaves the others) for what is
    missing or too old; then, for whatever still is, one short try of the package index."""
    wheel_dir = REPO / cfg.wheels
    names = [n.name.split("-")[0].lower().replace("_", "-") for n in wheel_dir.glob("*.whl")]
    before = installed_versions([*REQUIRED, *FOR_TRL, *names], env)
    result = dict(before=before, installed=[], failed=[])
    if cfg.dry_run:
        result["note"] = "dry run: nothing installed"
    else:
        for wheel in wheels_to_install(wheel_dir, before):
            ok = pip(["--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(SITE),
                      str(wheel)], timeout=120)
            result["installed" if ok else "failed"].append(wheel.name)
            say(f"{'installed' if ok else 'could not install'} {wheel.name}")
        missing = unmet(installed_versions([*REQUIRED, *FOR_TRL], env), {**REQUIRED, **FOR_TRL})
        if missing:                       # the GPU machine reaches no index: this fails within seconds there
            specs = [f"{n}>={REQUIRED[n]}" if REQUIRED.get(n, "0") != "0" else n for n in missing]
            say(f"still missing or too old: {missing}; trying the package index for {specs}")
            result["index"] = pip(["--retries", "0", "--timeout", "5", *specs], timeout=90)
    result["after"] = installed_versions([*REQUIRED, *FOR_TRL], env)
    result["unmet"] = unmet(result["after"], REQUIRED)
    result["trl_unmet"] = unmet(result["after"], FOR_TRL)
    return result


def pip(args: list[str], timeout: float) -> bool:
    """`pip install -q ARGS`; whether it succeeded within `timeout` seconds."""
    try:
        return subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], capture_output=True,
                              timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


# ---------------------------------------------------------------- facts (run in a child process: --facts_json)
def nvidia_smi() -> dict:
    fields = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit,pcie.link.gen.max"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return dict(error=str(e))
    rows = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]
    return dict(gpus=rows) if rows else dict(error=(out.stderr or out.stdout).strip())


def measure_facts(dry_run: bool) -> dict:
    """The machine, the versions, and the two ceilings the bench's ratios divide by."""
    import platform
    import torch
    facts = dict(python=platform.python_version(), platform=platform.platform(), cpus=os.cpu_count(),
                 nvidia_smi=nvidia_smi(), torch=torch.__version__, cuda=torch.version.cuda,
                 cuda_available=torch.cuda.is_available())
    for name in ("transformers", "trl", "datasets", "accelerate"):
        facts[name] = _dist_version(name)
    facts["commit"] = os.environ.get("GPU_QUICK_COMMIT") or git_commit()
    device = "cuda" if facts["cuda_available"] else "cpu"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        facts.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                     memory_gb=p.total_memory / 1e9)
    n, dtype = (8192, torch.bfloat16) if device == "cuda" and not dry_run else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a                                                            # warm-up: clocks and cuBLAS's choice
    facts["matmul"] = dict(n=n, dtype=str(dtype), tflops=2 * n ** 3 * 10 / _timed(lambda: a @ a, 10, device) / 1e12)
    x = torch.ones(1 << (30 if device == "cuda" else 26), device=device)
    y = torch.empty_like(x)
    facts["copy_gbs"] = 2 * x.nbytes * 10 / _timed(lambda: y.copy_(x), 10, device) / 1e9       # read + write
    return facts


def git_commit() -> str | None:
    """The checkout's commit, '+local changes' when tracked files differ; None without git or .git (the GPU machine
    gets a copy of the tree without its history: pass GPU_QUICK_COMMIT there)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def _dist_version(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _timed(fn, repeats: int, device: str) -> float:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------- phases: command, then what its output means
def phase_command(name: str, cfg: Quick, tmp: Path) -> list[str]:
    workload = WORKLOADS["dry" if cfg.dry_run else "gpu"]
    bench = [sys.executable, BENCH, *workload]
    return {
        "facts": [sys.executable, str(Path(__file__).resolve()), "--facts_json", str(tmp / "facts.json"),
                  "--dry_run", str(cfg.dry_run)],
        "ours": [*bench, "--steps", "2", "--warmup", "1", "--json", str(tmp / "ours.json")],
        "cuda_tests": [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-p",
                       "no:cacheprovider"],
        "trl": [*bench, "--engine", "trl", "--steps", "1", "--warmup", "1", "--json", str(tmp / "trl.json")],
        "compile": [*bench, "--only_generation", "--compile_generation", "--steps", "2", "--warmup", "1",
                    "--json", str(tmp / "compile.json")],
    }[name]


STEP_LINE = re.compile(r"^step (\d+)/(\d+)( \(warm-up\))?: (.*)$")
TEST_LINE = re.compile(r"^(tests/test_cuda\.py::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def step_lines(output: str) -> list[dict]:
    """bench_grpo.py's per-step lines ('step 2/3: generation 1.20s  reward 0.00s ...'): what a cut-off run left."""
    steps = []
    for line in output.splitlines():
        m = STEP_LINE.match(line.strip())
        if m:
            times = {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)s", m.group(4))}
            steps.append(dict(step=int(m.group(1)), of=int(m.group(2)), warmup=bool(m.group(3)), time=times))
    return steps


def parse_result(name: str, tmp: Path, output: str, records: dict) -> dict:
    """What a phase measured: its JSON file when it finished, else whatever its printed lines still tell."""
    if name == "cuda_tests":
        tests = {m.group(1).split("::")[1]: m.group(2) for m in map(TEST_LINE.match, output.splitlines()) if m}
        totals = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
        return dict(tests=tests, summary=totals[-1] if totals else None)
    path = tmp / f"{name}.json"
    if not path.is_file():
        return dict(partial_steps=step_lines(output)) if name != "facts" else {}
    result = json.loads(path.read_text())
    ours, facts = records.get("ours", {}).get("result", {}), records.get("facts", {}).get("result", {})
    if result.get("mfu") and facts.get("cuda_available"):      # MFU against what the card reached, not its datasheet
        result["mfu_of_measured"] = result["mfu"] * result["peak_flops"] / (facts["matmul"]["tflops"] * 1e12)
    if name == "trl" and ours.get("step_time"):
        result["ours_over_trl"] = ours["step_time"] / result["step_time"]
    if name == "compile" and ours.get("phases"):                  # phase 2's eager generation, same prompts
        eager = ours["phases"]["generation"]
        result["eager_generation"] = eager
        result["speedup"] = eager / result["phases"]["generation"]
    return result


def skip_reason(name: str, cfg: Quick, records: dict) -> str | None:
    """Why a phase cannot run (None: it can): what setup or facts found missing, or not chosen."""
    if name not in cfg.phases.split(","):
        return "not in --phases"
    setup_result = records.get("setup", {}).get("result", {})
    if name != "facts" and setup_result.get("unmet"):
        return (f"missing or too old: {', '.join(f'{n} {v}' for n, v in setup_result['unmet'].items())} (needs "
                f"{', '.join(f'{n} >= {REQUIRED[n]}' for n in setup_result['unmet'])}; carry bench/gpu_wheels.sh's)")
    facts = records.get("facts", {})
    if name != "facts" and not cfg.dry_run and facts.get("status") in ("ok", "failed", "timeout") \
            and not facts.get("result", {}).get("cuda_available"):
        return "no CUDA device (the facts phase found torch.cuda.is_available() false, or did not finish)"
    if name == "trl" and setup_result.get("trl_unmet"):
        return (f"TRL cannot run without {', '.join(setup_result['trl_unmet'])} (pip install trl, or carry "
                f"bench/gpu_wheels.sh's wheels)")
    return None


# ---------------------------------------------------------------- running a phase under a time limit
def run_logged(cmd: list[str], timeout: float, env: dict, log) -> tuple[str, int | None, str]:
    """cmd in a new process group, its output echoed and logged line by line; on timeout the whole group is
    killed (compile workers included). Returns (status, exit code, output)."""
    lines = []
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            log.write(line)
            log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code, status = proc.wait(), "timeout"
    reader.join(timeout=10)
    return status, code, "".join(lines)


class Results:
    """gpu_quick.jsonl, appended one phase at a time, and gpu_quick.md, rewritten from every record so far."""

    def __init__(self, out: Path, cfg: Quick):
        self.out, self.cfg, self.records = out, cfg, {}
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl, self.md = out / "gpu_quick.jsonl", out / "gpu_quick.md"

    def add(self, record: dict) -> None:
        record = dict(record, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.records[record["phase"]] = record
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            self.md.write_text(markdown(self.records, self.cfg))
        except Exception as e:                # the JSONL above holds every number; the table is a convenience
            self.md.write_text(f"(the table could not be written: {e!r}; see {self.jsonl.name})\n")


def run_setup(cfg: Quick, env: dict, say) -> dict:
    """Phase 0 as a record; a setup that breaks is recorded, and the phases then fail with their own errors."""
    started = time.monotonic()
    try:
        result = setup(cfg, env, say)
        status = "ok" if not result["unmet"] else "failed"
        say(f"setup: {summary('setup', dict(status='ok', result=result))}; versions {result['after']}")
    except Exception as e:
        result, status = dict(error=repr(e)), "failed"
        say(f"setup: failed: {e!r}")
    return dict(phase="setup", status=status, seconds=round(time.monotonic() - started, 1), result=result)


def run_phase(name: str, cfg: Quick, tmp: Path, records: dict, seconds_left: float, env: dict, log, say) -> dict:
    """One phase as a record: skipped with the reason, or run under min(its limit, what is left) and read."""
    cap, least = (300, 1) if cfg.dry_run else LIMITS[name]
    cmd = phase_command(name, cfg, tmp)
    record = dict(phase=name, command=shlex.join(cmd))
    reason = skip_reason(name, cfg, records)
    if reason is None and seconds_left < least:
        reason = f"only {max(seconds_left, 0):.0f}s of the budget left (needs {least}s)"
    if reason:
        say(f"{name}: skipped: {reason}")
        return dict(record, status="skipped", reason=reason)
    limit = min(cap, seconds_left)
    say(f"{name}: {record['command']}  (limit {limit:.0f}s)")
    started = time.monotonic()
    status, code, output = run_logged(cmd, limit, env, log)
    seconds = round(time.monotonic() - started, 1)
    try:
        result = parse_result(name, tmp, output, records)
    except Exception as e:                    # keep the record (and the command) even if the output surprises us
        result = dict(parse_error=repr(e))
    reason = None
    if status != "ok":                        # the lines that say why, in the record and the table
        tail = [line for line in output.splitlines() if line.strip()][-8:]
        result["output_tail"] = tail
        reason = (f"exit code {code}" if status == "failed" else f"killed after {seconds:.0f}s (limit)") \
            + (f": {tail[-1].strip()[:300]}" if tail else "")
    say(f"{name}: {status} in {seconds:.0f}s" + (f" ({reason})" if reason else ""))
    return dict(record, status=status, seconds=seconds, exit_code=code, reason=reason, result=result)


def main(argv=None) -> int:
    cfg, _ = parse_config(Quick, sys.argv[1:] if argv is None else argv)
    if cfg.facts_json:
        Path(cfg.facts_json).write_text(json.dumps(measure_facts(cfg.dry_run), indent=1))
        return 0
    deadline = time.monotonic() + cfg.budget_s
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO / cfg.out
    results = Results(out, cfg)
    site = None if cfg.dry_run else str(SITE)                       # carried wheels go first on the path
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p))
    with open(out / "gpu_quick.log", "a") as log, tempfile.TemporaryDirectory() as tmp:
        def say(text):
            sys.stdout.write(f"[gpu_quick] {text}\n")
            log.write(f"[gpu_quick] {text}\n")
            log.flush()

        say(f"{'dry run on the CPU' if cfg.dry_run else 'GPU check'}; budget {cfg.budget_s:.0f}s; results in {out}")
        results.add(run_setup(cfg, env, say))
        for name in PHASES:                   # 5 s kept for the last record and the table
            seconds_left = deadline - time.monotonic() - 5
            results.add(run_phase(name, cfg, Path(tmp), results.records, seconds_left, env, log, say))
        say(f"done; {results.jsonl} and {results.md}")
    print("\n" + results.md.read_text())
    return 0 if all(r["status"] in ("ok", "skipped") for r in results.records.values()) else 1


# ---------------------------------------------------------------- the markdown for docs/PERFORMANCE.md
def markdown(records: dict, cfg: Quick) -> str:
    facts = records.get("facts", {}).get("result", {})
    ours = records.get("ours", {}).get("result", {})
    gpus = facts.get("nvidia_smi", {}).get("gpus", [{}])
    lines = [f"### The 15-minute GPU check: {gpus[0].get('name', facts.get('device', 'no GPU'))}"
             + (" (dry run on the CPU)" if cfg.dry_run else ""), ""]
    if facts:
        command = "python bench/gpu_quick.py --dry_run" if cfg.dry_run else "bash bench/gpu_quick.sh"
        gpu = (f"{gpus[0]['memory.total']}, driver {gpus[0]['driver_version']}, {facts.get('sms')} SMs; "
               if "memory.total" in gpus[0] else "")
        lines += [f"`{command}` at {facts.get('commit')}: torch {facts.get('torch')} (CUDA "
                  f"{facts.get('cuda')}), transformers {facts.get('transformers')}, TRL {facts.get('trl')}; {gpu}"
                  f"measured {facts['matmul']['n']}^3 {facts['matmul']['dtype'].replace('torch.', '')} matmul "
                  f"{facts['matmul']['tflops']:.3g} TFLOP/s, copy {facts['copy_gbs']:,.0f} GB/s.", ""]
    workload = " ".join(WORKLOADS["dry" if cfg.dry_run else "gpu"])
    lines += [f"Workload (bench_grpo.py): `{workload}`, every completion full length, beta 0, one optimizer step "
              f"per rollout, gradient checkpointing" + (f"; prompts {ours['prompt_tokens']['min']}.."
                                                         f"{ours['prompt_tokens']['max']} tokens (median "
                                                         f"{ours['prompt_tokens']['median']:g})" if ours else "") + ".",
              "", "| phase | status | wall s | result |", "|---|---|---|---|"]
    for name, record in records.items():
        try:
            cell = summary(name, record)
        except Exception as e:                # e.g. a phase that printed something unexpected
            cell = f"see gpu_quick.jsonl ({e!r})"
        lines.append(f"| {name} | {record['status']} | {record.get('seconds', '')} | {cell} |")
    if ours.get("phases"):
        plan = ours["memory_plan"]
        lines += ["", "Our step by phase (median of the measured steps):", "",
                  "| phase | s | peak GB | planned GB |", "|---|---|---|---|"]
        for phase, t in ours["phases"].items():
            planned = f"{plan[phase]:.3g}" if phase in ("generation", "update") else ""
            lines.append(f"| {phase} | {t:.3f} | {ours['phase_peak_gb'][phase]:.2f} | {planned} |")
        lines.append(f"| step | {ours['step_time']:.3f} | {ours['peak_gb']:.2f} | {plan['peak']:.3g} |")
        lines += ["", "Memory plan terms (GB; bench_grpo.memory_plan): "
                  + ", ".join(f"{k} {v:.3g}" for k, v in plan["terms"].items() if v)]
    return "\n".join(lines) + "\n"


def summary(name: str, record: dict) -> str:
    """One cell: the phase's main numbers, or why it has none."""
    r = record.get("result", {})
    if record["status"] == "skipped":
        return f"skipped: {record['reason']}"
    if name == "setup":
        lacking = lambda unmet: ", ".join(f"{n} {v or 'missing'}" for n, v in unmet.items())    # noqa: E731
        return "; ".join([f"installed {', '.join(r['installed']) or 'nothing'}"]
                         + ([f"could not install {', '.join(r['failed'])}"] if r["failed"] else [])
                         + ([f"too old or missing: {lacking(r['unmet'])}"] if r["unmet"] else [])
                         + ([f"for TRL: {lacking(r['trl_unmet'])}"] if r["trl_unmet"] else []))
    if name == "facts":
        if not r:
            return record.get("reason") or ""
        gpu = r.get("nvidia_smi", {}).get("gpus", [{}])[0]
        card = f"{gpu['name']}, {gpu['memory.total']}" if "name" in gpu else f"no GPU ({r['nvidia_smi'].get('error')})"
        return (f"{card}; CUDA available: {r['cuda_available']}; {r['matmul']['dtype'].replace('torch.', '')} "
                f"matmul {r['matmul']['tflops']:.3g} TFLOP/s, copy {r['copy_gbs']:,.0f} GB/s")
    if name == "cuda_tests":
        failed = [t for t, outcome in r.get("tests", {}).items() if outcome in ("FAILED", "ERROR")]
        return (r.get("summary") or "no summary line") + (f"; failed: {', '.join(failed)}" if failed else "")
    if record["status"] != "ok" and "partial_steps" not in r:
        return record.get("reason") or ""
    if "partial_steps" in r:
        done = "; ".join(f"step {s['step']}: " + ", ".join(f"{k} {v:.2f}s" for k, v in s["time"].items())
                         for s in r["partial_steps"])
        return f"{record.get('reason')}; {done or 'no step finished'}"
    if name == "ours":
        peak, plan = r["peak_gb"], r["memory_plan"]["peak"]
        mfu = (f"update MFU {r['mfu']:.3f} of {r['peak_flops'] / 1e12:.3g} TFLOP/s ({r['peak_source']})"
               + (f", {r['mfu_of_measured']:.3f} of the measured matmul" if "mfu_of_measured" in r else "") + "; ")
        return (f"step {r['step_time']:.2f}s ({', '.join(f'{k} {v:.2f}' for k, v in r['phases'].items())}); {mfu}"
                f"generation {r['generation_fraction']:.3f} of the decode limit; peak {peak:.3g} GB, planned "
                f"{plan:.3g} GB; {r['step_time'] / r['floor']:.1f}x the floor of {r['floor']:.3g}s")
    if name == "trl":
        ratio = f"; ours / TRL = {r['ours_over_trl']:.3f}" if "ours_over_trl" in r else ""
        return f"TRL step {r['step_time']:.2f}s, peak {r['peak_gb']:.1f} GB{ratio}"
    if name == "compile":
        steps = ", ".join(f"{s['generation']:.2f}" for s in r.get("step_phases", []))
        eager = (f" vs {r['eager_generation']:.2f}s eager: {r['speedup']:.2f}x" if "speedup" in r
                 else " (no eager generation to compare: the ours phase did not finish)")
        return (f"generation {r['phases']['generation']:.2f}s compiled (measured steps: {steps}), "
                f"{r['generation_fraction']:.3f} of the decode limit{eager}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
