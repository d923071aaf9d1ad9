"""Pretraining with a DeepSpeed engine. ``train`` reads top to bottom: checks that need no process group (flags,
DeepSpeed JSON, the run lock, the master port), the process group, the checkpoint to resume, data, model, engine,
then ``Pretraining.loop``: steps, log lines, evaluations and checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from bertds.data import PretrainingBatches, prepare_for_training
from bertds.data.tokenizer import TOKENIZER_FILE, Vocab
from bertds.distributed import check_master_port, init_distributed, launch_rank, shutdown_distributed
from bertds.engine.checkpoint import (
    CHECKPOINTS,
    check_batch_layout,
    check_compatible,
    find_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from bertds.engine.config import load_ds_config, resolve_batch_sizes, with_lr
from bertds.engine.gathered import all_devices, write_full_weights
from bertds.engine.host_memory import keep_freed_memory
from bertds.engine.optim import adapt_optimization, parameter_groups
from bertds.engine.preemption import PreemptionWatcher
from bertds.engine.runlock import RunLock
from bertds.engine.step import GradientNorm, micro_step
from bertds.engine.tracking import METRICS_FILE, WANDB_ID_FILE, Tracker
from bertds.engine.train_config import TrainConfig
from bertds.errors import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, TrainingDiverged, UserError, run_cli
from bertds.evaluate import HeldOutEvaluation, describe, heldout_examples
from bertds.hf import loaded_model_name
from bertds.model import BertConfig, BertForPreTraining, get_config, num_parameters
from bertds.pretrained import CONFIG_FILE, WEIGHTS_CHECKSUM_FILE, WEIGHTS_FILE, load_pretrained, save_pretrained
from bertds.supervise import report_exit_status

__all__ = ["RunState", "TrainConfig", "TrainingDiverged", "main", "train"]

RUN_CONFIG_FILE = "train_config.json"
RUN_MARKERS = (RUN_CONFIG_FILE, METRICS_FILE, CHECKPOINTS, WEIGHTS_FILE)
# What a run writes into --output-dir; --overwrite removes all of it, so nothing of the old run stays beside the new.
RUN_OUTPUTS = (*RUN_MARKERS, WEIGHTS_CHECKSUM_FILE, CONFIG_FILE, TOKENIZER_FILE, "loss.png", WANDB_ID_FILE, "wandb")


class MetricSums:
    """Sums over the micro-batches since the last log line, kept on the device (adding never waits for it);
    ``all_reduce`` sums them over the ranks in one collective and returns them by name."""

    NAMES = ("mlm_loss", "nsp_loss", "micro_batches", "tokens", "mlm_correct", "mlm_count", "nonfinite")

    def __init__(self, device: torch.device, values: torch.Tensor | None = None):
        self.values = torch.zeros(len(self.NAMES), device=device) if values is None else values.to(device)

    def add(self, out, batch: dict[str, torch.Tensor]) -> None:
        """One micro-batch; a non-finite loss is counted, not summed."""
        mlm = out.mlm_loss.detach()
        nsp = out.nsp_loss.detach() if out.nsp_loss is not None else torch.zeros_like(mlm)
        finite = torch.isfinite(mlm) & torch.isfinite(nsp)
        named = {
            "mlm_loss": torch.where(finite, mlm, 0.0),
            "nsp_loss": torch.where(finite, nsp, 0.0),
            "micro_batches": torch.ones_like(mlm),
            "tokens": batch["valid_len"].sum(),
            "mlm_correct": out.mlm_correct,
            "mlm_count": out.mlm_count,
            "nonfinite": ~finite,
        }
        self.values += torch.stack([named[name].float() for name in self.NAMES])

    def all_reduce(self) -> dict[str, float]:
        dist.all_reduce(self.values)
        return dict(zip(self.NAMES, self.values.tolist()))

    def zero_(self) -> None:
        self.values.zero_()


@dataclass
class RunState:
    """What a checkpoint must hold beyond the engine for an exact resume."""

    step: int = 0
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MetricSums.NAMES, 0.0))
    elapsed: float = 0.0
    preempted: bool = False


@dataclass
class LogWindow:
    """Wall-clock bookkeeping of the steps since the last log line."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    skipped_before: int = 0


# --- checks before the process group ----------------------------------------------------------------------------


def build_ds_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed JSON, checked, with ``--lr`` applied; the model's positions checked against ``--max-len``."""
    ds_config = with_lr(load_ds_config(cfg.deepspeed_config), cfg.lr)
    max_positions = get_config(cfg.model).max_position_embeddings
    if cfg.data.max_len > max_positions:
        raise UserError(f"--max-len {cfg.data.max_len} exceeds the model's {max_positions} positions; lower --max-len")
    return ds_config


def run_lock(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """Rank 0 holds the output directory for the run; the other ranks write into it only under its barriers."""
    return RunLock(cfg.output_dir) if launch_rank() == 0 else contextlib.nullcontext()


def check_output_dir(cfg: TrainConfig) -> None:
    output_dir = Path(cfg.output_dir)
    if cfg.resume or cfg.overwrite or not output_dir.is_dir():
        return
    found = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if found:
        raise UserError(
            f"--output-dir {output_dir} holds another run ({', '.join(found)}); pass --resume auto to "
            "continue it, --overwrite to replace it, or choose another --output-dir"
        )


def remove_previous_run(output_dir: Path) -> None:
    """``--overwrite``: the old run's outputs go before this run writes its first (rank 0, once set up)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# --- set-up ---------------------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, vocab) -> BertForPreTraining:
    """The model of ``--model``; or the weights of a finished bertds run (``--init-from``, same architecture) or of
    a Hugging Face BERT directory (``--init-from-hf``, whose config then defines the architecture)."""
    if cfg.init_from_hf:
        from bertds.hf import check_same_vocabulary, load_hf_pretrained

        model, hf_vocab = load_hf_pretrained(cfg.init_from_hf)
        check_same_vocabulary(vocab, hf_vocab, cfg.init_from_hf)
        model.train()
    else:
        model = BertForPreTraining(
            get_config(
                cfg.model,
                dropout=cfg.dropout,
                attention_dropout=cfg.dropout,
                tie_word_embeddings=not cfg.untie_embeddings,
                vocab_size=len(vocab),
                pad_token_id=vocab.pad_id,
                pre_layernorm=cfg.pre_ln,
                sentence_loss=cfg.data.sentence_task != "none",
            )
        )
    if cfg.init_from:
        source, source_vocab = load_pretrained(cfg.init_from)
        if source_vocab.fingerprint() != vocab.fingerprint() or source.config.hidden_size != model.config.hidden_size:
            raise UserError(
                f"--init-from {cfg.init_from} has another vocabulary or model size than this run; "
                "use the same corpus, tokenizer and --model as the run it comes from"
            )
        model.load_state_dict(source.state_dict())
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


def build_engine(cfg: TrainConfig, model: BertForPreTraining, optimization: tuple):
    """``optimization``: what ``adapt_optimization`` returned (config, client optimizer, client scheduler)."""
    engine_config, client_optimizer, client_scheduler = optimization
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model),
        config=engine_config,
        optimizer=client_optimizer,
        lr_scheduler=client_scheduler,
    )
    if cfg.compile:
        engine.compile()
    return engine


def build_tracker(cfg: TrainConfig, ds_config: dict, rank: int, resume_step: int) -> Tracker:
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        if cfg.overwrite:
            remove_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    return Tracker(
        output_dir,
        rank,
        {"train": asdict(cfg), "deepspeed": ds_config},
        cfg.wandb,
        cfg.wandb_project,
        cfg.wandb_run_name,
        resume_step=resume_step,
    )


def build_evaluation(cfg: TrainConfig, data, engine, device, rank: int, world_size: int) -> HeldOutEvaluation | None:
    heldout = heldout_examples(cfg.data, data, cfg.eval, rank)
    if heldout is None:
        return None
    return HeldOutEvaluation(heldout, cfg.eval.split, engine.train_micro_batch_size_per_gpu(), device, rank, world_size)


def restore(checkpoint: Path, engine, batches: PretrainingBatches, device, trust: bool) -> tuple[RunState, MetricSums]:
    """Engine, data position, RNG streams and the unlogged metric sums of a checkpoint."""
    check_batch_layout(checkpoint, engine)
    client_state, rank_state = load_training_checkpoint(engine, checkpoint, trust)
    batches.load_state_dict(rank_state["data"])
    return RunState(**{**client_state["run_state"], "preempted": False}), MetricSums(device, rank_state["window"])


# --- the run --------------------------------------------------------------------------------------------------


@dataclass
class Pretraining:
    """Everything the loop touches, built by ``train``."""

    cfg: TrainConfig
    ds_config: dict
    engine: deepspeed.DeepSpeedEngine
    model_config: BertConfig
    vocab: Vocab
    batches: PretrainingBatches
    tracker: Tracker
    evaluation: HeldOutEvaluation | None
    device: torch.device
    world_size: int
    state: RunState
    sums: MetricSums

    def __post_init__(self):
        self.grad_norm = GradientNorm(self.engine)

    def loop(self, watcher: PreemptionWatcher) -> None:
        cfg, state = self.cfg, self.state
        if self.device.type == "cpu":
            keep_freed_memory()  # the activations live in host memory: steps reuse it instead of faulting it in
        stream = iter(self.batches)
        progress = tqdm(
            total=cfg.max_steps,
            initial=state.step,
            disable=not self.tracker.active,
            desc="pretraining",
            file=sys.stdout,
        )
        window = LogWindow(skipped_before=self.engine.skipped_steps)
        while state.step < cfg.max_steps:
            self.step(stream, window)
            progress.update(1)
            final = state.step == cfg.max_steps
            if final or state.step % cfg.log_interval == 0:
                self.log(window)
                window = LogWindow(skipped_before=self.engine.skipped_steps)
            if final or (cfg.eval.interval and state.step % cfg.eval.interval == 0):
                window.start += self.evaluate()
            if watcher.should_stop():
                state.preempted = True
                self.save()
                break
            if final or (cfg.save_interval and state.step % cfg.save_interval == 0):
                self.save()
        progress.close()

    def step(self, stream, window: LogWindow) -> None:
        """One optimizer step: gradient accumulation's micro-batches through ``micro_step``."""
        step_start = time.perf_counter()
        for _ in range(self.engine.gradient_accumulation_steps()):
            wait_start = time.perf_counter()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(stream).items()}
            window.data_wait += time.perf_counter() - wait_start
            out = micro_step(self.engine, batch, grad_norm=self.grad_norm)
            self.sums.add(out, batch)
        self.state.step += 1
        self.state.elapsed += time.perf_counter() - step_start

    def log(self, window: LogWindow) -> None:
        """One all_reduce of the window's sums; a metrics record and a console line. A non-finite loss that the fp16
        loss scaler did not skip is divergence."""
        engine, state = self.engine, self.state
        elapsed = time.perf_counter() - window.start
        sums = self.sums.all_reduce()
        self.sums.zero_()
        skipped = engine.skipped_steps - window.skipped_before
        expected_nonfinite = (
            skipped * engine.gradient_accumulation_steps() * self.world_size if engine.fp16_enabled() else 0
        )
        if sums["nonfinite"] > expected_nonfinite:
            raise TrainingDiverged(
                f"the loss became NaN/inf at step {state.step} (in the last {self.cfg.log_interval}"
                f" steps); the last good checkpoint is kept in "
                f"{Path(self.cfg.output_dir) / CHECKPOINTS}. Lower --lr, add warmup or gradient "
                "clipping, then --resume auto"
            )
        state.totals = {name: state.totals[name] + value for name, value in sums.items()}
        record = self.record(sums, elapsed, window.data_wait)
        self.tracker.log(record)
        scaled = record["loss_scale"] is not None
        self.tracker.print(
            f"step {state.step:>6}/{self.cfg.max_steps} | mlm {record['mlm_loss']:.3f} | nsp {record['nsp_loss']:.3f}"
            f" | mlm acc {record['mlm_accuracy']:.3f} | lr {record['lr']:.2e} | {record['pairs_per_s']:.1f}"
            f" pairs/s | {record['tokens_per_s']:.0f} tokens/s | data wait {record['data_wait_pct']:.1f}%"
            + (f" | scale {record['loss_scale']:.0f} skipped {record['skipped_steps']}" if scaled else "")
        )

    def record(self, sums: dict[str, float], elapsed: float, data_wait: float) -> dict:
        engine = self.engine
        finite_batches = max(sums["micro_batches"] - sums["nonfinite"], 1)
        steps = sums["micro_batches"] / (engine.gradient_accumulation_steps() * self.world_size)
        scale = getattr(engine.optimizer, "loss_scale", None) if engine.fp16_enabled() else None
        return {
            "step": self.state.step,
            "mlm_loss": sums["mlm_loss"] / finite_batches,
            "nsp_loss": sums["nsp_loss"] / finite_batches,
            "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_count"], 1),
            "lr": engine.get_lr()[0],
            "loss_scale": float(scale) if scale is not None else None,
            "skipped_steps": engine.skipped_steps,
            "grad_norm": self.grad_norm.get(),
            "pairs_per_s": steps * engine.train_batch_size() / elapsed,
            "tokens_per_s": sums["tokens"] / elapsed,
            "data_wait_pct": 100 * data_wait / elapsed,
        }

    def evaluate(self) -> float:
        """Scores the held-out examples; returns the seconds it took (left out of the throughput)."""
        if self.evaluation is None:
            return 0.0
        metrics = self.evaluation(self.engine, self.model_config.sentence_loss)
        self.tracker.log_eval({"step": self.state.step, **metrics, "train_seconds": self.state.elapsed})
        self.tracker.print(
            f"eval step {self.state.step} | {describe(metrics, metrics['split'])} | {metrics['eval_seconds']:.1f} s"
        )
        return metrics["eval_seconds"]

    def save(self) -> None:
        client_state = {"run_state": asdict(self.state), "world_size": self.world_size}
        rank_state = {"data": self.batches.state_dict(), "window": self.sums.values.cpu()}
        path = save_training_checkpoint(
            self.engine,
            Path(self.cfg.output_dir),
            self.state.step,
            client_state,
            rank_state,
            self.vocab,
            self.model_config,
            self.cfg.keep_last,
            self.cfg.data.max_len,
        )
        self.tracker.print(f"checkpoint: {path}")

    def finish(self) -> dict:
        """The run's summary, the full fp32 weights (gathered, also under ZeRO-3) and train_config.json."""
        totals, engine, output_dir = self.state.totals, self.engine, Path(self.cfg.output_dir)
        devices = all_devices(self.device)
        result = {
            "mlm_loss": totals["mlm_loss"] / totals["micro_batches"],
            "nsp_loss": totals["nsp_loss"] / totals["micro_batches"],
            "steps": self.state.step,
            "pairs_per_s": self.state.step * engine.train_batch_size() / self.state.elapsed,
            "devices": devices,
            "eval": self.evaluation.last if self.evaluation else None,
        }
        self.tracker.print(f"MLM loss {result['mlm_loss']:.3f}, NSP loss {result['nsp_loss']:.3f}")
        self.tracker.print(f"{result['pairs_per_s']:.1f} sentence pairs/sec on [{', '.join(devices)}]")

        def write(state_dict: dict[str, torch.Tensor]) -> None:
            save_pretrained(state_dict, self.model_config, self.vocab, output_dir)
            (output_dir / RUN_CONFIG_FILE).write_text(
                json.dumps({"train": asdict(self.cfg), "deepspeed": self.ds_config, "result": result}, indent=2) + "\n"
            )

        write_full_weights(engine, write)
        self.tracker.print(f"saved model, config and vocabulary to {output_dir}")
        return result


def train(cfg: TrainConfig) -> RunState:
    """Runs (or resumes) pretraining; returns the final run state."""
    ds_config = build_ds_config(cfg)
    with run_lock(cfg) as lock:
        check_output_dir(cfg)
        check_master_port()
        rank, world_size = init_distributed()
        output_dir = Path(cfg.output_dir)
        checkpoint = find_checkpoint(output_dir, cfg.resume, cfg.data.max_len, cfg.trust_checkpoint)
        ds_config = resolve_batch_sizes(ds_config, world_size, cfg.batch_size)
        optimization = adapt_optimization(ds_config, cfg.max_steps)

        data = prepare_for_training(cfg.data, rank)
        torch.manual_seed(cfg.data.seed)
        model = build_model(cfg, data.vocab)
        cfg = replace(cfg, model=loaded_model_name(model.config, cfg.init_from_hf)) if cfg.init_from_hf else cfg
        if checkpoint is not None:
            check_compatible(checkpoint, model.config, data.vocab)
        engine = build_engine(cfg, model, optimization)
        device = torch.device(get_accelerator().current_device_name())
        batches = PretrainingBatches(
            data.examples,
            engine.train_micro_batch_size_per_gpu(),
            rank,
            world_size,
            seed=cfg.data.seed,
            num_workers=cfg.data.num_workers,
            masking=data.masking,
        )
        state, sums = (
            restore(checkpoint, engine, batches, device, cfg.trust_checkpoint)
            if checkpoint
            else (RunState(), MetricSums(device))
        )
        if state.step >= cfg.max_steps:
            if rank == 0:
                print(
                    f"{checkpoint} is already at step {state.step} of --max-steps {cfg.max_steps}; nothing to do "
                    "(raise --max-steps to train further)"
                )
            return state

        tracker = build_tracker(cfg, ds_config, rank, resume_step=state.step)
        if lock is not None and lock.stale_message():
            tracker.print(lock.stale_message())
        tracker.print(
            f"data: {len(data.examples)} sentence pairs, vocabulary {len(data.vocab)}, "
            f"{'cached' if data.from_cache else 'prepared'} at {data.path}"
        )
        tracker.print(
            f"model: {cfg.model}, {num_parameters(model) / 1e6:.1f}M parameters; world size {world_size}, "
            f"micro batch {engine.train_micro_batch_size_per_gpu()}, accumulation "
            f"{engine.gradient_accumulation_steps()}" + (f"; resumed from {checkpoint}" if checkpoint else "")
        )
        evaluation = build_evaluation(cfg, data, engine, device, rank, world_size)
        if evaluation is None:
            tracker.print(f"eval: no held-out text ('{cfg.eval.split}' split of the corpus); pass --eval-corpus")
        run = Pretraining(
            cfg,
            ds_config,
            engine,
            model.config,
            data.vocab,
            batches,
            tracker,
            evaluation,
            device,
            world_size,
            state,
            sums,
        )

        watcher = PreemptionWatcher(cfg.stop_timeout)
        try:
            run.loop(watcher)
            watcher.disarm()  # the steps are over: a signal from here on waits for the final save
            if state.preempted:
                tracker.print(f"stopped ({watcher.reason}) after step {state.step}; resume with --resume auto")
            else:
                run.finish()
        finally:
            watcher.close()
        tracker.finish()
        return state


def main(cfg: TrainConfig) -> int:
    """CLI entry: user errors exit 2, divergence 3, preemption 75 (after saving a checkpoint). Any other exception
    (a bug, a lost peer) is printed and ends this rank at once, without waiting on the others: their launcher then
    stops them."""
    try:
        code = run_cli(lambda: EXIT_PREEMPTED if train(cfg).preempted else EXIT_OK)
    except BaseException:
        traceback.print_exc()
        report_exit_status(EXIT_FAILED)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)
    report_exit_status(code)  # now: a late stop signal may end this rank while it waits for its peers to leave
    shutdown_distributed(wait_for_peers=code in (EXIT_OK, EXIT_PREEMPTED))
    return code
