"""bertds' training step against d2l's own BERT code (the ``d2l`` package's ``BERTModel``, ``torch.optim.Adam``,
the book's ``train_bert`` step and timer; see bench/d2l_book.py) and, with --transformers, against
``transformers.BertForPreTraining``: same model size, same batches (bertds' d2l-recipe batches, in d2l's dtypes for
d2l), the initial weights carried over where the structures allow.
First it proves, in this process, that bertds computes what a plain eager BERT computes (equal losses on the first
two steps in eval mode, i.e. without dropout, the second after one optimizer update) against the local replica of
d2l's structure with BERT's details (bench/reference_bert.py; d2l's own model differs: ReLU, no embedding LayerNorm).
Then it times rounds: in every round each contender runs in a fresh process of its own (the order rotating, so that
load from other processes hits them all alike) on the batches and initial weights saved here, --warmup untimed steps
then --steps-per-round timed ones (only the steps are timed). d2l's and transformers' processes get the environment
this bench was started with, as a user runs their code (torch's defaults unless the user set otherwise); bertds'
process gets what its training job sets for itself (OMP_WAIT_POLICY=PASSIVE unless set, as launcher/pretrain.py
does; freed host memory kept, as the training loop does). All get --threads torch threads. It prints the median
step time over the rounds, pairs/s, achieved GFLOP/s (and the share of --peak-tflops) and the ratios to d2l.

    python bench/vs_reference.py --model tiny --max-len 64 --batch 512 --threads 2 [--peak-tflops 0.17]
"""

from __future__ import annotations

import os

USER_ENV = dict(os.environ)  # before this process sets up its own process group: the workers start from it

import argparse
import importlib.metadata
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import d2l_book
from bench.reference_bert import BERTModel, load_bertds_state_dict, pretraining_loss
from bench.throughput import (
    STEPS,
    BenchConfig,
    achieved,
    build_model,
    check,
    ds_config,
    load_batches,
    model_flops,
    split_parameters,
)
from bertds.distributed import init_distributed, shutdown_distributed
from bertds.engine.host_memory import keep_freed_memory
from bertds.errors import UserError, run_cli
from bertds.model import MODEL_PRESETS

Batch = dict[str, torch.Tensor]
WORKERS = ("bertds", "transformers")  # the contenders timed by this script's --worker mode (d2l: bench/d2l_book.py)


@dataclass
class Contender:
    """A contender as this process runs it: one training step that returns the detached total loss."""

    name: str
    step: Callable[[Batch], torch.Tensor]
    set_training: Callable[[bool], None]


def bertds_contender(name: str, cfg: BenchConfig, vocab_size: int, pad_id: int, mlm_loss: str) -> Contender:
    model = build_model(cfg, vocab_size, pad_id)
    if cfg.compile:
        model.bert.compile()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(cfg))
    step = STEPS[mlm_loss]

    def total_loss(batch: Batch) -> torch.Tensor:
        return step(engine, batch).loss.detach()

    return Contender(name, total_loss, engine.train)


def replica_contender(cfg: BenchConfig, vocab_size: int, pad_id: int) -> Contender:
    source = build_model(cfg, vocab_size, pad_id)
    net = BERTModel(source.config).to(get_accelerator().current_device_name())
    load_bertds_state_dict(net, source.state_dict())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(batch: Batch) -> torch.Tensor:
        loss = pretraining_loss(net, batch, vocab_size)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Contender("replica (bench/reference_bert)", step, net.train)


def hf_contender(cfg: BenchConfig, vocab_size: int, pad_id: int) -> Contender:
    import transformers

    from bertds.hf import to_hf_config, to_hf_state_dict

    source = build_model(cfg, vocab_size, pad_id)
    net = transformers.BertForPreTraining(to_hf_config(source.config))
    net.load_state_dict(to_hf_state_dict(source.state_dict(), source.config), strict=False)
    net.to(get_accelerator().current_device_name())
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)

    def step(batch: Batch) -> torch.Tensor:
        tokens = batch["tokens"].long()
        labels = torch.full_like(tokens, -100)  # the real prediction slots carry labels, nothing else
        real = batch["mlm_weights"] > 0
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(real)
        labels[rows[real], batch["pred_positions"].long()[real]] = batch["mlm_labels"].long()[real]
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < batch["valid_len"][:, None]
        loss = net(
            input_ids=tokens,
            token_type_ids=batch["segments"].long(),
            attention_mask=mask.long(),
            labels=labels,
            next_sentence_label=batch["nsp_label"].long(),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return Contender(f"transformers {transformers.__version__}", step, net.train)


def check_same_computation(cfg: BenchConfig, vocab_size: int, pad_id: int, batches: list[Batch]) -> None:
    """bertds' step against the replica: equal total losses on steps 1 and 2 (eval mode, one update between)."""
    print("same computation: total loss (MLM + NSP) on steps 1 and 2 from the same initial weights, eval mode")
    losses = {}
    for c in (replica_contender(cfg, vocab_size, pad_id), bertds_contender("bertds", cfg, vocab_size, pad_id, "fused")):
        c.set_training(False)
        losses[c.name] = [c.step(batches[i]).item() for i in range(2)]
        print(f"  {c.name:<32} {losses[c.name][0]:.6f}  {losses[c.name][1]:.6f}")
    replica, ours = losses.values()
    if any(abs(a - b) > 1e-4 * abs(b) for a, b in zip(ours, replica)):
        raise RuntimeError(f"bertds computes different losses {ours} than the replica {replica}")


def time_steps(contender: Contender, batches: list[Batch], warmup: int, steps: int) -> dict:
    """``warmup`` untimed then ``steps`` timed training steps on the batches (cycled); wall time of the timed ones."""
    contender.set_training(True)
    cycle = itertools.cycle(batches)
    for _ in range(warmup):
        contender.step(next(cycle)).item()
    start = time.perf_counter()
    losses = [contender.step(next(cycle)) for _ in range(steps)]
    get_accelerator().synchronize()
    losses = [x.item() for x in losses]
    return {"step_s": (time.perf_counter() - start) / steps, "losses": losses}


def run_worker(cfg: BenchConfig, kind: str, inputs_path: str, result_path: str, warmup: int, steps: int) -> None:
    """The process of one contender in one round: builds it from the saved weights, times its steps, writes JSON."""
    init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    if kind == "bertds" and device.type == "cpu":
        keep_freed_memory()  # as the main job's training loop does
    inputs = torch.load(inputs_path, weights_only=True)
    batches = [{k: v.to(device) for k, v in b.items()} for b in inputs["batches"]]
    vocab_size, pad_id = inputs["config"]["vocab_size"], inputs["config"]["pad_token_id"]
    if kind == "bertds":
        contender = bertds_contender("bertds", cfg, vocab_size, pad_id, "fused")
    else:
        contender = hf_contender(cfg, vocab_size, pad_id)
    Path(result_path).write_text(json.dumps(time_steps(contender, batches, warmup, steps)))


@dataclass
class Worker:
    """How one round of a contender is started: a fresh process, its command line and environment."""

    name: str
    argv: list[str]
    env: dict[str, str]

    def run(self, result_path: Path) -> dict:
        cmd = [*self.argv, str(result_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT)
        if proc.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        result = json.loads(result_path.read_text())
        result_path.unlink()
        return result


def workers(cfg: BenchConfig, args: argparse.Namespace, inputs: Path) -> list[Worker]:
    """d2l's process and bertds' (and transformers'): the user's environment for d2l and transformers, the training
    job's settings on top of it for bertds."""
    env = {**USER_ENV, "PYTHONPATH": str(ROOT)}
    bertds_env = {**env, "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY", "PASSIVE")}  # as launcher/pretrain.py
    steps = ["--warmup", str(args.warmup), "--steps", str(args.steps_per_round), "--threads", str(args.threads)]
    d2l = [sys.executable, str(ROOT / "bench" / "d2l_book.py"), str(inputs), *steps, "--lr", str(cfg.lr)]
    shape = ["--model", cfg.model, "--max-len", str(cfg.max_len), "--batch", str(cfg.micro_batch), "--lr", str(cfg.lr)]
    shape += ["--precision", cfg.precision, *(["--compile"] if cfg.compile else [])]
    own = [sys.executable, str(Path(__file__).resolve()), *shape, *steps, "--inputs", str(inputs), "--worker"]
    found = [Worker("d2l (its own code)", d2l, env), Worker("bertds (engine micro_step)", [*own, "bertds"], bertds_env)]
    if args.transformers:
        if importlib.util.find_spec("transformers") is None:
            raise UserError("--transformers: transformers is not installed")
        found.append(Worker(f"transformers {importlib.metadata.version('transformers')}", [*own, "transformers"], env))
    return found


def time_rounds(contenders: list[Worker], rounds: int, scratch: Path) -> dict[str, list[dict]]:
    """Each contender's result in each round, each in a fresh process; the order rotates every round."""
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders[r % len(contenders) :] + contenders[: r % len(contenders)]:
            results[c.name].append(c.run(scratch / "result.json"))
            print(f"  round {r + 1}: {c.name:<28} {results[c.name][-1]['step_s']:.3f} s/step", flush=True)
    return results


def save_inputs(cfg: BenchConfig, data, batch_list: list[Batch], path: Path) -> None:
    """The batches and bertds' initial weights every worker starts from."""
    model = build_model(cfg, len(data.vocab), data.vocab.pad_id)
    batches = [{k: v.cpu() for k, v in b.items()} for b in batch_list]
    torch.save({"batches": batches, "state_dict": model.state_dict(), "config": model.config.to_dict()}, path)


def report(cfg: BenchConfig, results: dict[str, list[dict]], flops: float) -> dict:
    reference = statistics.median(x["step_s"] for x in next(iter(results.values())))
    summary = {}
    for name, rounds in results.items():
        times = [x["step_s"] for x in rounds]
        t = statistics.median(times)
        gflops, share = achieved(flops / t, cfg.peak_tflops)
        summary[name] = {
            "step_s": t,
            "pairs_per_s": cfg.micro_batch / t,
            "speedup": reference / t,
            "gflops": gflops,
            "peak_pct": share,
        }
        print(
            f"  {name:<28} {t:.3f} s/step  {cfg.micro_batch / t:8.1f} pairs/s  ×{reference / t:.2f} vs d2l  "
            f"{gflops:6.1f} GFLOP/s{f' ({share:.1f}% of peak)' if share is not None else ''}"
            f"  (rounds: {' '.join(f'{x:.2f}' for x in times)})"
        )
    return summary


def main_run(cfg: BenchConfig, args: argparse.Namespace) -> dict:
    check(cfg)
    _, world_size = init_distributed()
    if world_size != 1:
        raise UserError("vs_reference compares single-process steps; run it with plain python, not a launcher")
    device = torch.device(get_accelerator().current_device_name())
    data, batches = load_batches(cfg, 0, 1)  # first: `datasets` looks for the real torchvision that d2l's stubs hide
    if d2l_book.import_d2l() is None:
        raise UserError("the d2l package is not installed; pip install d2l --no-deps")
    batch_list = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(iter(batches), 4)]
    vocab_size, pad_id = len(data.vocab), data.vocab.pad_id
    policy = USER_ENV.get("OMP_WAIT_POLICY")
    print(
        f"model {cfg.model} | max_len {cfg.max_len} | batch {cfg.micro_batch} | {cfg.precision} | {device} | "
        f"{args.threads or 'default'} threads | lr {cfg.lr} | batches: bertds' d2l-recipe batches for all | "
        f"processes: d2l{' and transformers' if args.transformers else ''} with OMP_WAIT_POLICY "
        f"{policy or 'unset'}, bertds with {policy or 'PASSIVE'} and freed memory kept"
    )
    check_same_computation(cfg, vocab_size, pad_id, batch_list)

    with tempfile.TemporaryDirectory(prefix="bertds-vs-reference-") as scratch:
        inputs = Path(scratch) / "inputs.pt"
        save_inputs(cfg, data, batch_list, inputs)
        print(
            f"timing: {args.rounds} rounds, each contender in a fresh process per round: {args.warmup} untimed + "
            f"{args.steps_per_round} timed steps (dropout on, as the recipe)"
        )
        results = time_rounds(workers(cfg, args, inputs), args.rounds, Path(scratch))
    unmapped = next(iter(results.values()))[0]["unmapped"]
    print(
        f"d2l {d2l_book.d2l_version()}: bertds' initial weights copied into d2l.BERTModel except {unmapped} "
        "(no counterpart); d2l's own ReLU, LayerNorm eps 1e-5, untied decoder"
    )
    model = build_model(cfg, vocab_size, pad_id)
    per_token, per_slot = split_parameters(model)
    slots = statistics.mean(int((b["mlm_weights"] > 0).sum()) for b in batch_list)
    flops = model_flops(model.config, per_token, per_slot, cfg.micro_batch * cfg.max_len, slots, cfg.max_len)
    print(
        f"median step time of {args.rounds} rounds; GFLOP/s of bertds' model FLOPs ({flops / 1e9:.1f} GFLOP/step, as "
        "bench/throughput.py counts them)"
    )
    return report(cfg, results, flops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help=f"one of {', '.join(MODEL_PRESETS)}")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bertds' precision (d2l: fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile bertds' encoder")
    p.add_argument("--transformers", action="store_true", help="also time transformers.BertForPreTraining")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps in each contender's process, each round")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01, help="the book's Adam learning rate")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    p.add_argument("--peak-tflops", type=float, help="the machine's dense peak (2 Zen-4 cores: about 0.17 fp32)")
    p.add_argument("--data-dir", help="WikiText-2 directory; default: env BERTDS_DATA_DIR, else the hub")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)  # one contender's process (time_rounds)
    p.add_argument("--inputs", help=argparse.SUPPRESS)  # with --worker: the saved batches and weights
    p.add_argument("result", nargs="?", help=argparse.SUPPRESS)  # with --worker: where its JSON goes
    args = p.parse_args(argv)

    def run() -> dict | None:
        if min(args.rounds, args.steps_per_round) < 1 or args.warmup < 0:
            raise UserError("--rounds and --steps-per-round must be positive, --warmup non-negative")
        cfg = BenchConfig(
            model=args.model,
            max_len=args.max_len,
            micro_batch=args.batch,
            compile=args.compile,
            precision=args.precision,
            lr=args.lr,
            peak_tflops=args.peak_tflops,
            data_dir=args.data_dir,
        )
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.worker:
            run_worker(cfg, args.worker, args.inputs, args.result, args.warmup, args.steps_per_round)
            return None
        return main_run(cfg, args)

    try:
        return run_cli(run)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
