"""The pretraining options: each flag of ``launcher/pretrain.py`` is declared once here (default, type, help), and a
``TrainConfig`` checks its own values when it is built, so a bad flag fails before data preparation or the process
group starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bertds.data import DataConfig
from bertds.data.config import check_writable_dir
from bertds.errors import UserError
from bertds.evaluate import EvalConfig
from bertds.model import MODEL_PRESETS
from bertds.options import option

CHECKPOINT_OPTIONS = "checkpoints"  # --help sections
TRACKING_OPTIONS = "tracking"


@dataclass
class TrainConfig:
    """Flags of ``launcher/pretrain.py``; the defaults are the d2l recipe."""

    deepspeed_config: str
    data: DataConfig = field(default_factory=DataConfig)
    model: str = option("tiny", f"model preset: {', '.join(MODEL_PRESETS)}")
    batch_size: int | None = option(
        None, "global batch (sentence pairs per optimizer step, split over ranks); default: the JSON's train_batch_size"
    )
    max_steps: int = option(50, "optimizer steps")
    lr: float | None = option(None, "peak learning rate; default: the JSON's optimizer lr")
    output_dir: str = option("runs/pretrain", "where the model, vocabulary, checkpoints and metrics go")
    log_interval: int = option(10, "steps between log lines")
    dropout: float | None = option(None, "override the preset's dropout (0 <= p < 1)")
    untie_embeddings: bool = option(False, "separate MLM decoder and token embedding")
    activation_checkpointing: bool = option(False, "recompute encoder blocks in backward")
    compile: bool = option(False, "torch.compile the model through engine.compile()")
    init_from: str | None = option(None, "start from the weights of a finished run's --output-dir (two-phase)")
    init_from_hf: str | None = option(
        None, "start from a Hugging Face BERT directory (its config and weights; the data must use its tokenizer)"
    )
    save_interval: int = option(0, "steps between checkpoints (0: only at the end)", group=CHECKPOINT_OPTIONS)
    keep_last: int = option(3, "checkpoints to keep (0: keep all)", group=CHECKPOINT_OPTIONS)
    resume: str | None = option(
        None, "'auto' (latest checkpoint in --output-dir, if any) or a checkpoint path", group=CHECKPOINT_OPTIONS
    )
    trust_checkpoint: bool = option(
        False,
        "resume from checkpoint files that need full unpickling (which can run "
        "code): only for checkpoints from a source you trust",
        group=CHECKPOINT_OPTIONS,
    )
    overwrite: bool = option(
        False,
        "replace the run in --output-dir (its checkpoints, metrics and weights are removed once this run has started)",
        group=CHECKPOINT_OPTIONS,
    )
    stop_timeout: float = option(
        120.0,
        "after a stop signal, seconds a rank waits for its step to finish before "
        "taking a peer for lost and exiting without a checkpoint",
        group=CHECKPOINT_OPTIONS,
    )
    wandb: bool = option(True, "do not log to Weights & Biases", group=TRACKING_OPTIONS)
    wandb_project: str = option("bertds", "Weights & Biases project", group=TRACKING_OPTIONS)
    wandb_run_name: str | None = option(None, "Weights & Biases run name", group=TRACKING_OPTIONS)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pre_ln: bool = option(
        False,
        "pre-LayerNorm blocks plus a final LayerNorm (stable at higher learning rates; not exportable to Hugging Face)",
    )

    def __post_init__(self) -> None:
        bounds = [
            ("--max-steps", self.max_steps, 1, ""),
            ("--log-interval", self.log_interval, 1, ""),
            ("--save-interval", self.save_interval, 0, " (0: only at the end)"),
            ("--keep-last", self.keep_last, 0, " (0: keep all)"),
        ]
        if self.batch_size is not None:
            bounds.append(("--batch-size", self.batch_size, 1, ""))
        for flag, value, minimum, meaning in bounds:
            if value < minimum:
                raise UserError(f"{flag} {value} must be at least {minimum}{meaning}; pass a value >= {minimum}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(
                f"--lr {self.lr} must be positive; pass e.g. --lr 1e-4, or leave it out to use the "
                "DeepSpeed config's lr"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout {self.dropout} must be in [0, 1); pass e.g. --dropout 0.1")
        if not self.stop_timeout > 0:
            raise UserError(f"--stop-timeout {self.stop_timeout} must be positive (seconds)")
        if self.overwrite and self.resume:
            raise UserError("--overwrite replaces the run in --output-dir and --resume continues it; pass one")
        check_writable_dir(Path(self.output_dir).expanduser(), "--output-dir")
