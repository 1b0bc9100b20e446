"""--report_to: TensorBoard's event files and an offline wandb run hold what metrics.jsonl holds, read back with
each tracker's own reader (wandb: its protobuf records); a missing package is one line before anything loads."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import train
from test_train import SHORT, read_metrics

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_holds_the_metrics_config_and_samples(tmp_path):
    pytest.importorskip("tensorboard", reason="optional: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray
    train.main(["--output_dir", str(tmp_path), "--max_steps", "3", "--eval_data", "none",
                "--report_to", "tensorboard"] + SHORT)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows = read_metrics(tmp_path)
    assert sorted(events.Tags()["scalars"]) == sorted(k for k in rows[0] if k != "step")   # the same names
    for key in rows[0]:
        if key != "step":                                  # TensorBoard stores float32
            assert [(e.step, e.value) for e in events.Scalars(key)] == \
                [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-30)) for r in rows], key
    [config] = events.Tensors("config/text_summary")
    text = make_ndarray(config.tensor_proto).item().decode()
    assert json.loads(text.strip("`\n")) == json.loads((tmp_path / "train_config.json").read_text())
    samples = read_jsonl(tmp_path / "samples.jsonl")
    tables = events.Tensors("samples")
    assert [t.step for t in tables] == [1, 2, 3]           # --log_samples_every 1
    header, *cells = make_ndarray(tables[0].tensor_proto).tolist()   # a 2-D string tensor: TensorBoard's table
    assert [h.decode() for h in header] == list(samples[0])
    assert [c.decode() for c in cells[0]] == [str(v) for v in samples[0].values()]


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB-log chunks (4-byte checksum, 2-byte
    length, 1-byte type: 1 whole record, 2/3/4 its first/middle/last part) that never cross a 32 KiB block."""
    from wandb.proto.wandb_internal_pb2 import Record
    data, pos, part, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                        # block tail too short for a chunk header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


def test_wandb_offline_run_holds_the_metrics_config_and_samples(tmp_path):
    pytest.importorskip("wandb", reason="optional: pip install wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}  # nothing outside tmp_path, no network
    (tmp_path / "wandb_dir").mkdir()
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "--output_dir", str(out), "--max_steps", "2", "--eval_data",
           "none", "--cpu_threads", "1", "--report_to", "wandb"] + SHORT
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = (tmp_path / "wandb_dir" / "wandb").glob("offline-run-*")
    [run_file] = run_dir.glob("run-*.wandb")
    records = wandb_records(run_file)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = read_metrics(out)
    metrics = [h for h in history if "reward" in h]
    assert [h["_step"] for h in metrics] == [1, 2]
    for h, row in zip(metrics, rows):
        assert {k: h[k] for k in row if k != "step"} == {k: v for k, v in row.items() if k != "step"}
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in run.config.update}
    assert {k: config[k] for k in ("reward_fn", "max_steps", "report_to")} == \
        {"reward_fn": "rewards.toolrl:toolrl_reward", "max_steps": 2, "report_to": "wandb"}
    assert sorted(p.name.split("_")[1] for p in (run_dir / "files" / "media" / "table").glob("samples_*")) == \
        ["1", "2"]                                          # the samples table of each step


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_a_missing_tracker_is_one_line_with_the_install_hint(package, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)        # import raises ImportError, as when not installed
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(out), "--report_to", package])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == \
        f"train.py: error: --report_to {package}: the {package} package is not installed (pip install {package})"
    assert not out.exists()                                # before any model loads or file is written
