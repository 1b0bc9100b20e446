"""Shared test fixtures: where the real data lives, and a skip when it is absent."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when that folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer trained on the built-in demo set (grpo/tiny.py); about 0.2 s."""
    from data.demo import demo_texts
    from grpo.tiny import build_tokenizer
    return build_tokenizer(demo_texts())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Qwen2 model + tokenizer (grpo/tiny.py), loadable with from_pretrained.

    Its generation_config.json holds Qwen2.5-Instruct's sampling defaults on purpose."""
    from grpo.tiny import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def run_then_sigkill(args: list[str], when: Path) -> None:
    """Run `python train.py ARGS` and kill it with SIGKILL (whatever it is doing at that moment) as soon as `when`
    exists (or after 120 s, or when it ends first)."""
    import signal
    import subprocess
    import sys
    import time
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(repo / "train.py"), *args], cwd=repo, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not when.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
