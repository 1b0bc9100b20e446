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
