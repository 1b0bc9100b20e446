"""`--report_to tensorboard|wandb`: every row of metrics.jsonl also goes to an experiment tracker (TRL's flag name).

metrics.jsonl stays the source of truth; a tracker gets the same metric names at the same steps, the config once
at the start, and the sample completions of samples.jsonl as a table (TensorBoard's text plugin draws a 2-D string
tensor as one; wandb.Table). Both packages are optional and imported only here, only when asked for.
Under torchrun, train.py opens a tracker on rank 0 alone.

    tensorboard   event files in OUTPUT_DIR/tensorboard/:   tensorboard --logdir OUTPUT_DIR
    wandb         a run in project $WANDB_PROJECT (default grpo-tool-calling), files under $WANDB_DIR (default
                  OUTPUT_DIR/wandb/); WANDB_MODE=offline keeps it on disk (wandb sync uploads it later)
"""
import importlib
import json
import os
from pathlib import Path

CHOICES = ["none", "tensorboard", "wandb"]


def missing_package(report_to: str) -> str | None:
    """One line with the install hint when the tracker's package is not importable; None when it is (or 'none')."""
    if report_to == "none":
        return None
    try:
        importlib.import_module(report_to)               # the package has the flag's name
    except ImportError:
        return f"--report_to {report_to}: the {report_to} package is not installed (pip install {report_to})"
    return None


class TensorBoard:
    def __init__(self, out: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run hides the events of steps after its checkpoint (written before a crash, then
        # lost with the weights), as metrics.jsonl drops those rows
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", start_step)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()                              # a killed run keeps every step it logged

    def table(self, name: str, rows: list[dict], step: int) -> None:
        import numpy as np
        from tensorboard.plugins.text.summary_v2 import text_pb
        columns = list(rows[0])
        cells = np.array([columns] + [[str(row.get(c, "")) for c in columns] for row in rows])    # header first
        # torch's SummaryWriter has no public call for a ready-made summary; its file writer takes one
        self.writer._get_file_writer().add_summary(text_pb(name, cells), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, out: Path, config: dict, start_step: int):
        import wandb
        self.wandb = wandb
        # a resumed run is a new wandb run whose steps continue from the checkpoint's
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "grpo-tool-calling"), name=out.name,
                              dir=os.environ.get("WANDB_DIR", str(out)), config=config)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def table(self, name: str, rows: list[dict], step: int) -> None:
        columns = list(rows[0])
        self.run.log({name: self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                     step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, out: Path, config: dict, start_step: int):
    """A tracker with log(metrics, step), table(name, rows, step) and close(); None for 'none'."""
    return {"tensorboard": TensorBoard, "wandb": Wandb}[report_to](out, config, start_step) \
        if report_to != "none" else None
