"""Memory planner: per-GPU bytes of parameters, gradients, optimizer states and activations for a BERT preset under a
ZeRO stage, before any GPU is rented.

    python -m bertds.plan --model large --max-len 512 --micro-batch 8 --zero 2 --precision bf16 --gpus 64 \
        --gpu-memory 80

Model states follow DeepSpeed's accounting (Adam, mixed precision): 2 bytes/parameter 16-bit weights and gradients,
16 bytes/parameter fp32 master weights, fp32 gradient partition, momentum and variance; ZeRO-1 partitions the 16,
ZeRO-2 also the gradients, ZeRO-3 also the weights (plus the largest layer gathered, 4 bytes/parameter);
``--offload`` puts the optimizer (and gradients) in CPU memory. fp32 training: 4 + 4 bytes weights and gradients,
8 bytes Adam moments.

Activations are what autograd keeps per post-LN layer with SDPA: per token 8·hidden + 2·ffn values (layer input, qkv,
attention output, residual sum, LayerNorm output, GELU input and output, second residual sum), two 1-byte dropout
masks per hidden value and fp32 LayerNorm statistics; attention keeps only a log-sum-exp per head and query when the
flash kernel runs (CUDA with bf16/fp16), else the (heads, L, L) probabilities, dropout mask and dropped
probabilities. With activation checkpointing only every layer's input is kept, plus one layer's activations while
it is recomputed. The MLM head keeps the (B, P, V) logits, their fp32 copy and log-softmax (the engine's loss).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from bertds.data.masking import MASK_RATE
from bertds.errors import UserError, run_cli
from bertds.model import MODEL_PRESETS, BertConfig, BertForPreTraining, get_config, num_parameters
from bertds.options import add_options, from_args, option

GiB = 2**30


PRECISIONS = ["fp32", "bf16", "fp16"]


@dataclass
class JobShape:
    """What a training job's memory and speed depend on, shared by the memory plan and bench/throughput.py; the
    defaults are BERT-Large's phase 2."""

    model: str = option("large", f"model preset: {', '.join(MODEL_PRESETS)}")
    max_len: int = option(512, "tokens per sequence")
    micro_batch: int = option(8, "sequences per GPU per step")
    zero: int = option(2, "ZeRO stage 0-3")
    precision: str = option("bf16", "training precision", choices=PRECISIONS)

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise UserError(f"unknown model '{self.model}'; choose one of {', '.join(MODEL_PRESETS)}")
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero {self.zero}: ZeRO stages are 0, 1, 2, 3")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose {', '.join(PRECISIONS)}")
        if self.micro_batch < 1 or self.max_len < 1:
            raise UserError("--micro-batch and --max-len must be positive")


@dataclass
class PlanConfig(JobShape):
    gpus: int = option(8, "data-parallel GPUs in total")
    gpus_per_node: int = option(8, "for the CPU memory of --offload")
    gpu_memory_gib: float = option(80.0, "GiB per GPU", flag="--gpu-memory")
    offload: bool = option(False, "ZeRO-2/3 optimizer states in CPU memory")
    vocab_size: int = option(BertConfig.vocab_size, "vocabulary size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.offload and self.zero < 2:
            raise UserError("--offload (CPU optimizer offload) needs --zero 2 or 3")
        if min(self.gpus, self.gpus_per_node) < 1 or self.gpu_memory_gib <= 0:
            raise UserError("--gpus, --gpus-per-node and --gpu-memory must be positive")


@dataclass
class Plan:
    parameters: int
    largest_layer: int
    params_bytes: float  # per GPU
    grads_bytes: float
    optimizer_bytes: float
    gathered_bytes: float  # ZeRO-3: the largest layer's weights and gradients, gathered
    activations_bytes: float
    activations_checkpointed_bytes: float
    cpu_bytes_per_node: float  # offloaded optimizer states and gradients
    flash_attention: bool

    @property
    def model_states_bytes(self) -> float:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.gathered_bytes


def count_parameters(config: BertConfig) -> tuple[int, int]:
    """(unique parameters, parameters of the largest single module) of the model, built on the meta device."""
    with torch.device("meta"):
        model = BertForPreTraining(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return num_parameters(model), largest


def model_state_bytes(params: int, largest: int, cfg: PlanConfig) -> tuple[float, float, float, float, float]:
    """(weights, gradients, optimizer states, gathered ZeRO-3 working set) per GPU and CPU bytes per node."""
    n = cfg.gpus
    weight, grad, states = (2, 2, 16) if cfg.precision in ("bf16", "fp16") else (4, 4, 8)
    params_b = params * weight / (n if cfg.zero == 3 else 1)
    grads_b = params * grad / (n if cfg.zero >= 2 else 1)
    optim_b = params * states / (n if cfg.zero >= 1 else 1)
    gathered = 4 * largest if cfg.zero == 3 else 0
    cpu = 0.0
    if cfg.offload:  # optimizer states and gradient partitions live in host memory, per rank of the node
        cpu = (optim_b + grads_b) * min(cfg.gpus_per_node, n)
        optim_b, grads_b = 0.0, 0.0
    return params_b, grads_b, optim_b, gathered, cpu


def activation_bytes(config: BertConfig, cfg: PlanConfig, flash: bool) -> tuple[float, float]:
    """(without, with) activation checkpointing, per GPU for one micro-batch."""
    b, s, h, f, a, layers = (
        cfg.micro_batch,
        cfg.max_len,
        config.hidden_size,
        config.ffn_size,
        config.num_heads,
        config.num_layers,
    )
    e = 2 if cfg.precision in ("bf16", "fp16") else 4
    tokens = b * s
    attention = b * a * s * 4 if flash else b * a * s * s * (2 * e + 1)
    per_layer = tokens * (e * (8 * h + 2 * f) + 2 * h + 16) + attention
    embeddings = tokens * (e * h + h)  # LayerNorm input and dropout mask (its output is layer 0's input)
    slots = b * round(MASK_RATE * s)
    head = slots * (3 * e * h + config.vocab_size * (e + 8))
    full = embeddings + layers * per_layer + head
    checkpointed = embeddings + layers * tokens * h * e + per_layer + head
    return full, checkpointed


def plan(cfg: PlanConfig) -> Plan:
    config = get_config(cfg.model, vocab_size=cfg.vocab_size)
    if not 1 <= cfg.max_len <= config.max_position_embeddings:
        raise UserError(f"--max-len {cfg.max_len} is outside 1..{config.max_position_embeddings}")
    params, largest = count_parameters(config)
    flash = cfg.precision in ("bf16", "fp16")  # SDPA's flash kernel on CUDA
    weights, grads, optim, gathered, cpu = model_state_bytes(params, largest, cfg)
    full, checkpointed = activation_bytes(config, cfg, flash)
    return Plan(params, largest, weights, grads, optim, gathered, full, checkpointed, cpu, flash)


def report(cfg: PlanConfig, p: Plan) -> str:
    def gib(size: float) -> str:
        return f"{size / GiB:8.2f} GiB"

    budget = cfg.gpu_memory_gib * GiB
    lines = [
        f"{cfg.model}: {p.parameters / 1e6:.1f}M parameters (largest layer {p.largest_layer / 1e6:.1f}M), "
        f"max_len {cfg.max_len}, micro batch {cfg.micro_batch}, ZeRO-{cfg.zero}"
        f"{' + CPU optimizer offload' if cfg.offload else ''}, {cfg.precision}, {cfg.gpus} GPUs of "
        f"{cfg.gpu_memory_gib:g} GiB",
        f"per GPU: parameters          {gib(p.params_bytes)}",
        f"         gradients           {gib(p.grads_bytes)}",
        f"         optimizer states    {gib(p.optimizer_bytes)}",
    ]
    if cfg.zero == 3:
        lines.append(f"         gathered layer      {gib(p.gathered_bytes)}")
    lines += [
        f"         model states        {gib(p.model_states_bytes)}",
        f"         activations         {gib(p.activations_bytes)} (checkpointing: "
        f"{gib(p.activations_checkpointed_bytes).strip()}; attention "
        f"{'flash: no L×L matrix kept' if p.flash_attention else 'math path: L×L probabilities kept'})",
    ]
    if cfg.offload:
        lines.append(f"CPU memory per node (offloaded optimizer states and gradients): {gib(p.cpu_bytes_per_node)}")
    for name, acts in (
        ("without checkpointing", p.activations_bytes),
        ("with checkpointing", p.activations_checkpointed_bytes),
    ):
        total = p.model_states_bytes + acts
        verdict = "fits" if total <= budget else "does NOT fit"
        lines.append(
            f"{name}: {total / GiB:.2f} GiB of {cfg.gpu_memory_gib:g} GiB -> {verdict}, headroom "
            f"{(budget - total) / GiB:.2f} GiB ({100 * (budget - total) / budget:.0f}%)"
        )
    lines.append(
        "the headroom must also hold temporaries, DeepSpeed's communication buckets, the CUDA context "
        "(~1 GiB) and allocator fragmentation"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertds.plan", description=__doc__.split("\n")[0])
    add_options(p, PlanConfig)
    args = p.parse_args(argv)

    def run() -> None:
        cfg = from_args(PlanConfig, args)
        print(report(cfg, plan(cfg)))

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
