"""The named data sets ("toolrl", "toolrl-sft", "apibank"): pinned downloads checked by hash, served here
by a local HTTP server standing in for raw.githubusercontent.com (no test touches the network)."""
import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from grpo import evaluation
import train
from data import load_examples
from data import loaders
from data.loaders import DATASETS, DownloadError, file_digest

SFT = "dataset/rlla_4k_raw/rlla_sft.json"
APIBANK = [f"benchmarks/API-Bank/level-{level}-api_processed.json" for level in (1, 2, 3)]
GOOD_OUTPUT = '<think> x </think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>'


class Repository:
    """A folder laid out like ToolRL's repository, served over HTTP on 127.0.0.1; counts GET requests."""

    def __init__(self, root):
        self.root, self.requests = root, []
        repository = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):
                repository.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, path: str, content: bytes) -> None:
        (self.root / path).parent.mkdir(parents=True, exist_ok=True)
        (self.root / path).write_bytes(content)


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A served repository as the download source, and an empty cache."""
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    repository = Repository(tmp_path / "repository")
    monkeypatch.setattr(loaders, "TOOLRL_RAW", repository.url)
    yield repository
    repository.server.shutdown()
    repository.server.server_close()


def cached_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def fake_toolrl(monkeypatch, repository, num_rows: int) -> None:
    """Serve a small ToolRL raw file as rlla_rl.json and pin "toolrl" to its blob id."""
    body = json.dumps([{"instruction": "sys", "input": f"<user> {i} </user>", "output": GOOD_OUTPUT}
                       for i in range(num_rows)]).encode()
    remote = DATASETS["toolrl"].files[0]
    repository.put(remote.path, body)
    monkeypatch.setitem(DATASETS, "toolrl", DATASETS["toolrl"]._replace(files=(remote._replace(digest=blob_id(body)),)))


def test_blob_id_is_what_git_hash_object_prints(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    path = tmp_path / "sample.json"
    path.write_bytes('[{"city": "Zürich"}]\n\0 no newline at the end'.encode())
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout
    assert file_digest(path, "git-blob") == expected.strip() == blob_id(path.read_bytes())
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()


def test_shared_copies_are_the_pinned_bytes(shared_data):
    pinned = {remote.path.rsplit("/", 1)[1]: remote.digest for name in ("toolrl-sft", "apibank")
              for remote in DATASETS[name].files}
    for name, digest in pinned.items():
        folder = "toolrl" if name.startswith("rlla") else "apibank"
        assert file_digest(shared_data / folder / name, "sha256") == digest, name


def test_real_files_download_once_and_load(shared_data, repository, tmp_path):
    repository.put(SFT, (shared_data / "toolrl" / "rlla_sft.json").read_bytes())
    for path in APIBANK:
        repository.put(path, (shared_data / "apibank" / path.rsplit("/", 1)[1]).read_bytes())

    sft = load_examples("toolrl-sft")
    apibank = load_examples("apibank")
    assert len(sft) == 400
    assert [sum(e.meta["level"] == level for e in apibank) for level in (1, 2, 3)] == [399, 67, 131]
    assert len(repository.requests) == 4
    assert cached_files(tmp_path) == ["level-1-api_processed.json", "level-2-api_processed.json",
                                      "level-3-api_processed.json", "rlla_sft.json"]  # no temporary file left

    assert load_examples("toolrl-sft") == sft and load_examples("apibank") == apibank
    assert len(repository.requests) == 4  # the second time, from the cache alone


def test_toolrl_download_has_the_papers_split(repository, monkeypatch):
    fake_toolrl(monkeypatch, repository, num_rows=100)
    test, train_rows = load_examples("toolrl", split="test"), load_examples("toolrl", split="train")
    assert (len(test), len(train_rows)) == (2, 98)  # int(0.02 * 100) = 2 test rows
    assert not {e.id for e in test} & {e.id for e in train_rows}
    assert len(repository.requests) == 1


def test_wrong_bytes_are_deleted_and_named(repository, tmp_path):
    wrong = b'[{"instruction": "a", "input": "b", "output": "<response> c </response>"}]'
    repository.put(SFT, wrong)
    with pytest.raises(DownloadError) as e:
        load_examples("toolrl-sft")
    message = str(e.value)
    assert hashlib.sha256(wrong).hexdigest() in message and DATASETS["toolrl-sft"].files[0].digest in message
    assert "deleted" in message and "--sft_data PATH" in message
    assert cached_files(tmp_path) == []


def test_unreachable_source_fails_at_once_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(loaders, "TOOLRL_RAW", f"http://127.0.0.1:{port}/")
    start = time.monotonic()
    with pytest.raises(DownloadError) as e:
        load_examples("toolrl-sft")
    assert time.monotonic() - start < 5
    message = str(e.value)
    assert message.startswith(f"could not download rlla_sft.json from http://127.0.0.1:{port}/{SFT} (")
    assert message.endswith("; pass a local copy with train.py --sft_data PATH (or --data PATH, which --model "
                            "SmolLM2-135M-Instruct on a CPU warm-starts on too)") and "\n" not in message
    assert isinstance(e.value, SystemExit)  # train.py and eval.py stop with this line, no traceback
    assert cached_files(tmp_path) == []


def test_missing_file_names_the_http_error(repository):
    with pytest.raises(DownloadError) as e:
        load_examples("apibank")
    assert "could not download level-1-api_processed.json" in str(e.value) and "HTTP Error 404" in str(e.value)
    assert str(e.value).endswith("with eval.py --apibank_dir PATH")


def test_names_that_are_one_split_refuse_a_split():
    with pytest.raises(ValueError, match="'apibank' is one split"):
        load_examples("apibank", split="train")           # toolrl-sft, a ToolRL raw file, has ToolRL's splits


def test_eval_defaults_are_the_downloads(shared_data, repository, monkeypatch):
    config = evaluation.EvalConfig(limit=2)
    assert (config.toolrl_data, config.apibank_dir) == ("", "")
    fake_toolrl(monkeypatch, repository, num_rows=100)
    for path in APIBANK:
        repository.put(path, (shared_data / "apibank" / path.rsplit("/", 1)[1]).read_bytes())
    assert [e.id for e in evaluation.load_toolrl(config)] == [e.id for e in load_examples("toolrl", split="test")]
    assert [e.meta["level"] for e in evaluation.load_apibank(config)] == [1, 1, 2, 2, 3, 3]


def test_train_takes_the_names():
    assert train.configure(["--model", "Qwen2.5-1.5B-Instruct"]).data == "toolrl"
    assert train.configure(["--model", "Qwen2.5-1.5B-Instruct", "--sft_data", "toolrl-sft"]).sft_data == "toolrl-sft"
