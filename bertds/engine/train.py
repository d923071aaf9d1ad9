"""Pretraining with a DeepSpeed engine: data, model, ``deepspeed.initialize``, the step loop, checkpoints."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from tqdm import tqdm

from bertds.data import DataConfig, PretrainingBatches, prepare_for_training
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.checkpoint import (CHECKPOINTS, check_batch_layout, check_compatible, find_checkpoint,
                                      load_training_checkpoint, save_training_checkpoint)
from bertds.engine.config import load_ds_config, resolve_batch_sizes
from bertds.engine.optim import adapt_optimization, parameter_groups
from bertds.engine.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher
from bertds.engine.step import micro_step
from bertds.engine.tracking import METRICS_FILE, Tracker
from bertds.errors import UserError
from bertds.evaluate import EvalConfig, HeldOutEvaluation, describe, heldout_examples
from bertds.hf import loaded_model_name
from bertds.model import BertForPreTraining, get_config, num_parameters
from bertds.pretrained import WEIGHTS_FILE, load_pretrained, save_pretrained

DIVERGED_EXIT_CODE = 3
RUN_MARKERS = ("train_config.json", METRICS_FILE, CHECKPOINTS, WEIGHTS_FILE)
# Sums kept on the device between log steps: mlm loss, nsp loss, micro-batches, real tokens, correct MLM
# predictions, MLM predictions, micro-batches with a non-finite loss.
WINDOW_FIELDS = ("mlm_loss", "nsp_loss", "micro_batches", "tokens", "mlm_correct", "mlm_count", "nonfinite")


@dataclass
class TrainConfig:
    """Flags of ``launcher/pretrain.py``; the defaults are the d2l recipe."""

    deepspeed_config: str
    data: DataConfig = field(default_factory=DataConfig)
    model: str = "tiny"
    batch_size: int | None = None  # global sentence pairs per optimizer step; None: the JSON's train_batch_size
    max_steps: int = 50
    lr: float | None = None  # None: the JSON's optimizer lr
    output_dir: str = "runs/pretrain"
    log_interval: int = 10
    dropout: float | None = None
    untie_embeddings: bool = False
    activation_checkpointing: bool = False
    compile: bool = False
    init_from: str | None = None  # a finished run's output dir: start from its weights (e.g. phase 2 of 2)
    init_from_hf: str | None = None  # a Hugging Face BERT directory (needs the hf extra)
    save_interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3
    resume: str | None = None  # "auto" or a checkpoint directory
    trust_checkpoint: bool = False  # let DeepSpeed unpickle checkpoint files that hold more than tensors
    overwrite: bool = False
    wandb: bool = True
    wandb_project: str = "bertds"
    wandb_run_name: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    pre_ln: bool = False  # pre-LayerNorm blocks + a final LayerNorm (BertConfig.pre_layernorm)


class TrainingDiverged(Exception):
    exit_code = DIVERGED_EXIT_CODE


@dataclass
class RunState:
    """What a checkpoint must hold beyond the engine for an exact resume."""

    step: int = 0
    totals: list[float] = field(default_factory=lambda: [0.0] * len(WINDOW_FIELDS))
    elapsed: float = 0.0
    preempted: bool = False


def _check_output_dir(cfg: TrainConfig) -> None:
    output_dir = Path(cfg.output_dir)
    if cfg.resume or cfg.overwrite or not output_dir.is_dir():
        return
    found = [m for m in RUN_MARKERS if (output_dir / m).exists()]
    if found:
        raise UserError(f"--output-dir {output_dir} holds another run ({', '.join(found)}); pass --resume auto to "
                        "continue it, --overwrite to replace it, or choose another --output-dir")


def build_model(cfg: TrainConfig, vocab) -> BertForPreTraining:
    """The model of ``--model``; or the weights of a finished bertds run (``--init-from``, same architecture) or of
    a Hugging Face BERT directory (``--init-from-hf``, whose config then defines the architecture)."""
    if cfg.init_from_hf:
        from bertds.hf import check_same_vocabulary, load_hf_pretrained
        model, hf_vocab = load_hf_pretrained(cfg.init_from_hf)
        check_same_vocabulary(vocab, hf_vocab, cfg.init_from_hf)
        model.train()
    else:
        model = BertForPreTraining(get_config(
            cfg.model, dropout=cfg.dropout, attention_dropout=cfg.dropout, tie_word_embeddings=not cfg.untie_embeddings,
            vocab_size=len(vocab), pad_token_id=vocab.pad_id, pre_layernorm=cfg.pre_ln,
            sentence_loss=cfg.data.sentence_task != "none"))
    if cfg.init_from:
        source, source_vocab = load_pretrained(cfg.init_from)
        if source_vocab.fingerprint() != vocab.fingerprint() or source.config.hidden_size != model.config.hidden_size:
            raise UserError(f"--init-from {cfg.init_from} has another vocabulary or model size than this run; "
                            "use the same corpus, tokenizer and --model as the run it comes from")
        model.load_state_dict(source.state_dict())
    model.set_activation_checkpointing(cfg.activation_checkpointing)
    return model


def train(cfg: TrainConfig) -> RunState:
    """Runs (or resumes) pretraining; returns the final run state."""
    ds_config = load_ds_config(cfg.deepspeed_config)
    max_positions = get_config(cfg.model).max_position_embeddings
    if cfg.data.max_len > max_positions:
        raise UserError(f"--max-len {cfg.data.max_len} exceeds the model's {max_positions} positions; "
                        "lower --max-len")
    _check_output_dir(cfg)
    if cfg.lr is not None:
        ds_config.setdefault("optimizer", {"type": "Adam", "params": {}}).setdefault("params", {})["lr"] = cfg.lr

    rank, world_size = init_distributed()
    ds_config = resolve_batch_sizes(ds_config, world_size, cfg.batch_size)
    engine_config, client_optimizer, client_scheduler = adapt_optimization(ds_config, cfg.max_steps)
    accelerator = get_accelerator()
    device = torch.device(accelerator.current_device_name())
    output_dir = Path(cfg.output_dir)
    checkpoint = find_checkpoint(output_dir, cfg.resume, cfg.data.max_len, cfg.trust_checkpoint)

    data = prepare_for_training(cfg.data, rank)
    torch.manual_seed(cfg.data.seed)
    model = build_model(cfg, data.vocab)
    cfg = replace(cfg, model=loaded_model_name(model.config, cfg.init_from_hf)) if cfg.init_from_hf else cfg
    if checkpoint is not None:
        check_compatible(checkpoint, model.config, data.vocab)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model), config=engine_config,
                                           optimizer=client_optimizer, lr_scheduler=client_scheduler)
    if cfg.compile:
        engine.compile()
    batches = PretrainingBatches(data.examples, engine.train_micro_batch_size_per_gpu(), rank, world_size,
                                 seed=cfg.data.seed, num_workers=cfg.data.num_workers)
    state, window = RunState(), torch.zeros(len(WINDOW_FIELDS), device=device)
    if checkpoint is not None:
        check_batch_layout(checkpoint, engine)
        client_state, rank_state = load_training_checkpoint(engine, checkpoint, cfg.trust_checkpoint)
        state = RunState(**{**client_state["run_state"], "preempted": False})
        batches.load_state_dict(rank_state["data"])
        window = rank_state["window"].to(device)

    if state.step >= cfg.max_steps:
        if rank == 0:
            print(f"{checkpoint} is already at step {state.step} of --max-steps {cfg.max_steps}; nothing to do "
                  "(raise --max-steps to train further)")
        return state
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(output_dir, rank, {"train": asdict(cfg), "deepspeed": ds_config}, cfg.wandb,
                      cfg.wandb_project, cfg.wandb_run_name, resume_step=state.step)
    tracker.print(f"data: {len(data.examples)} sentence pairs, vocabulary {len(data.vocab)}, "
                  f"{'cached' if data.from_cache else 'prepared'} at {data.path}")
    tracker.print(f"model: {cfg.model}, {num_parameters(model) / 1e6:.1f}M parameters; world size {world_size}, "
                  f"micro batch {engine.train_micro_batch_size_per_gpu()}, accumulation "
                  f"{engine.gradient_accumulation_steps()}" + (f"; resumed from {checkpoint}" if checkpoint else ""))

    def save(step: int) -> None:
        client_state = {"run_state": asdict(state), "world_size": world_size}
        rank_state = {"data": batches.state_dict(), "window": window.cpu()}
        path = save_training_checkpoint(engine, output_dir, step, client_state, rank_state, data.vocab,
                                        model.config, cfg.keep_last, cfg.data.max_len)
        tracker.print(f"checkpoint: {path}")

    heldout = heldout_examples(cfg.data, data, cfg.eval, rank)
    evaluation = None if heldout is None else HeldOutEvaluation(
        heldout, cfg.eval.split, engine.train_micro_batch_size_per_gpu(), device, rank, world_size)
    if evaluation is None:
        tracker.print(f"eval: no held-out text ('{cfg.eval.split}' split of the corpus); pass --eval-corpus")

    def evaluate(step: int) -> float:
        """Scores the held-out examples; returns the seconds it took (left out of the throughput)."""
        if evaluation is None:
            return 0.0
        metrics = evaluation(engine, model.config.sentence_loss)
        tracker.log_eval({"step": step, **metrics, "train_seconds": state.elapsed})
        tracker.print(f"eval step {step} | {describe(metrics, metrics['split'])} | {metrics['eval_seconds']:.1f} s")
        return metrics["eval_seconds"]

    watcher = PreemptionWatcher()
    try:
        _loop(cfg, engine, batches, state, window, tracker, watcher, save, evaluate, device, world_size)
    finally:
        watcher.close()
    if state.preempted:
        tracker.print(f"stopped by signal {watcher.received} after step {state.step}; resume with --resume auto")
        tracker.finish()
        return state

    mlm, nsp, micro_batches, tokens = state.totals[:4]
    devices = [None] * world_size
    dist.all_gather_object(devices, str(device))
    result = {"mlm_loss": mlm / micro_batches, "nsp_loss": nsp / micro_batches, "steps": state.step,
              "pairs_per_s": state.step * engine.train_batch_size() / state.elapsed, "devices": devices,
              "eval": evaluation.last if evaluation else None}
    tracker.print(f"MLM loss {result['mlm_loss']:.3f}, NSP loss {result['nsp_loss']:.3f}")
    tracker.print(f"{result['pairs_per_s']:.1f} sentence pairs/sec on [{', '.join(devices)}]")
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank == 0:  # full fp32 weights, also under ZeRO-3
            save_pretrained(engine.module.state_dict(), model.config, data.vocab, output_dir)
            (output_dir / "train_config.json").write_text(json.dumps(
                {"train": asdict(cfg), "deepspeed": ds_config, "result": result}, indent=2) + "\n")
    tracker.print(f"saved model, config and vocabulary to {output_dir}")
    tracker.finish()
    return state


def _loop(cfg, engine, batches, state: RunState, window, tracker, watcher, save, evaluate, device,
          world_size) -> None:
    accumulation = engine.gradient_accumulation_steps()
    stream = iter(batches)
    one = torch.ones((), device=device)
    progress = tqdm(total=cfg.max_steps, initial=state.step, disable=not tracker.active, desc="pretraining",
                    file=sys.stdout)
    window_start, data_wait, skipped_before = time.perf_counter(), 0.0, engine.skipped_steps
    while state.step < cfg.max_steps:
        step_start = time.perf_counter()
        for _ in range(accumulation):
            wait_start = time.perf_counter()
            batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
            data_wait += time.perf_counter() - wait_start
            out = micro_step(engine, batch)
            nsp = out.nsp_loss.detach() if out.nsp_loss is not None else torch.zeros((), device=device)
            losses = torch.stack([out.mlm_loss.detach(), nsp])
            finite = torch.isfinite(losses).all()
            window += torch.stack([*torch.where(finite, losses, 0.0), one, batch["valid_len"].sum().float(),
                                   out.mlm_correct, out.mlm_count, (~finite).float()])
        state.step += 1
        state.elapsed += time.perf_counter() - step_start
        progress.update(1)
        final = state.step == cfg.max_steps
        if state.step % cfg.log_interval == 0 or final:
            _log(cfg, engine, state, window, tracker, time.perf_counter() - window_start, data_wait,
                 engine.skipped_steps - skipped_before, world_size)
            window.zero_()
            window_start, data_wait, skipped_before = time.perf_counter(), 0.0, engine.skipped_steps
        if final or (cfg.eval.interval and state.step % cfg.eval.interval == 0):
            window_start += evaluate(state.step)
        if watcher.should_stop():
            state.preempted = True
            save(state.step)
            break
        if final or (cfg.save_interval and state.step % cfg.save_interval == 0):
            save(state.step)
    progress.close()


def _log(cfg, engine, state: RunState, window, tracker, elapsed: float, data_wait: float, skipped: int,
         world_size: int) -> None:
    dist.all_reduce(window)
    sums = dict(zip(WINDOW_FIELDS, window.tolist()))
    finite_batches = sums["micro_batches"] - sums["nonfinite"]
    # fp16 overflow steps are skipped by the loss scaler and are expected; any other non-finite loss is divergence.
    expected_nonfinite = skipped * engine.gradient_accumulation_steps() * world_size if engine.fp16_enabled() else 0
    if sums["nonfinite"] > expected_nonfinite:
        raise TrainingDiverged(f"the loss became NaN/inf at step {state.step} (in the last {cfg.log_interval} "
                               f"steps); the last good checkpoint is kept in {Path(cfg.output_dir) / CHECKPOINTS}. "
                               "Lower --lr, add warmup or gradient clipping, then --resume auto")
    state.totals = [t + w for t, w in zip(state.totals, window.tolist())]
    steps = sums["micro_batches"] / (engine.gradient_accumulation_steps() * world_size)
    grad_norm = engine.get_global_grad_norm()
    scaler = getattr(engine.optimizer, "loss_scale", None) if engine.fp16_enabled() else None
    record = {
        "step": state.step,
        "mlm_loss": sums["mlm_loss"] / max(finite_batches, 1), "nsp_loss": sums["nsp_loss"] / max(finite_batches, 1),
        "mlm_accuracy": sums["mlm_correct"] / max(sums["mlm_count"], 1), "lr": engine.get_lr()[0],
        "loss_scale": float(scaler) if scaler is not None else None, "skipped_steps": engine.skipped_steps,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "pairs_per_s": steps * engine.train_batch_size() / elapsed, "tokens_per_s": sums["tokens"] / elapsed,
        "data_wait_pct": 100 * data_wait / elapsed,
    }
    tracker.log(record)
    tracker.print(f"step {state.step:>6}/{cfg.max_steps} | mlm {record['mlm_loss']:.3f} | nsp {record['nsp_loss']:.3f}"
                  f" | mlm acc {record['mlm_accuracy']:.3f} | lr {record['lr']:.2e} | {record['pairs_per_s']:.1f}"
                  f" pairs/s | {record['tokens_per_s']:.0f} tokens/s | data wait {record['data_wait_pct']:.1f}%"
                  + (f" | scale {record['loss_scale']:.0f} skipped {record['skipped_steps']}" if scaler else ""))


def main(cfg: TrainConfig) -> int:
    """CLI entry: user errors exit 2, divergence 3, preemption 75 (after saving a checkpoint)."""
    try:
        state = train(cfg)
    except (UserError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        shutdown_distributed()
    return PREEMPTED_EXIT_CODE if state.preempted else 0
