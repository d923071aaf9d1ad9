"""Metrics: console lines, ``metrics.jsonl``, Weights & Biases (rank 0 only) and the final ``loss.png``."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from bertds.fsutil import write_atomically

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id.txt"
TRAIN_SPLIT = "train"


def _wandb_mode() -> Literal["online", "offline", "disabled", "shared"]:
    """WANDB_MODE when set; otherwise online only with credentials, so a machine without them still logs (offline)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]  # type: ignore[return-value]  # as the user set it; wandb.init checks it
    netrc = Path.home() / ".netrc"
    logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


def read_metrics(output_dir: str | Path, split: str | None = TRAIN_SPLIT) -> list[dict]:
    """The records of ``split`` (training records have no "split" key); None: all of them."""
    path = Path(output_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in records if split is None or r.get("split", TRAIN_SPLIT) == split]


class Tracker:
    """Does nothing on ranks other than 0. ``resume_step`` keeps the metrics of steps up to it (a resumed run
    continues the file and the wandb run; lines a killed run logged after its last checkpoint are dropped)."""

    def __init__(
        self,
        output_dir: Path,
        rank: int,
        run_config: dict,
        use_wandb: bool,
        project: str,
        run_name: str | None,
        resume_step: int = 0,
    ):
        self.output_dir, self.active = Path(output_dir), rank == 0
        self.wandb_run = None
        if not self.active:
            return
        kept = [m for m in read_metrics(output_dir, None) if m["step"] <= resume_step] if resume_step else []
        write_atomically(self.output_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))
        if use_wandb:
            import wandb

            id_file = self.output_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow",
                dir=str(self.output_dir),
                config=run_config,
                mode=_wandb_mode(),
            )

    def log(self, record: dict, wandb_prefix: str = "", unlogged: tuple[str, ...] = ("step",)) -> None:
        """A metrics.jsonl line, and the record's other keys (``wandb_prefix`` + key) to wandb."""
        if not self.active:
            return
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(
                {wandb_prefix + k: v for k, v in record.items() if k not in unlogged and v is not None},
                step=record["step"],
            )

    def log_eval(self, record: dict) -> None:
        """A held-out evaluation (``record["split"]``): a metrics.jsonl line, wandb keys ``eval/...``."""
        self.log(record, wandb_prefix="eval/", unlogged=("step", "split"))

    def print(self, message: str) -> None:
        if self.active:
            tqdm.write(message, file=sys.stdout)

    def finish(self) -> None:
        if not self.active:
            return
        if self.wandb_run is not None:
            self.wandb_run.finish()
        plot_losses(self.output_dir)


def plot_losses(output_dir: Path) -> Path | None:
    """MLM and NSP loss per logged step (the d2l animator's final picture) and the held-out MLM loss, as
    ``loss.png``."""
    metrics = read_metrics(output_dir)
    held_out = [m for m in read_metrics(output_dir, None) if m.get("split", TRAIN_SPLIT) != TRAIN_SPLIT]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(steps, [m["mlm_loss"] for m in metrics], label="mlm")
    ax.plot(steps, [m["nsp_loss"] for m in metrics], label="nsp", linestyle="--")
    if held_out:
        ax.plot([m["step"] for m in held_out], [m["mlm_loss"] for m in held_out], "o", label="held-out mlm")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / "loss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
