import re

import pytest
import torch
from deepspeed.runtime.zero.stage3 import (
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_live,
)
from deepspeed.runtime.zero.stage_1_and_2 import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_live,
)

from bertds.model import BertForPreTraining, get_config
from bertds.plan import GiB, PlanConfig, activation_bytes, count_parameters, main, plan


def test_large_on_the_meta_device_has_335m_parameters():
    params, largest = count_parameters(get_config("large", vocab_size=30522))
    assert abs(params / 1e6 - 335) / 335 < 0.01
    assert largest == 30522 * 1024 + 30522  # the MLM decoder: the tied word embedding and its bias


@pytest.mark.parametrize(
    "zero,offload,gpus", [(2, False, 64), (2, True, 64), (3, False, 64), (3, True, 64), (2, False, 8), (3, False, 16)]
)
def test_model_states_match_deepspeed_estimators(zero, offload, gpus):
    cfg = PlanConfig(model="large", zero=zero, offload=offload, gpus=gpus, gpus_per_node=8, precision="bf16")
    p = plan(cfg)
    nodes = gpus // 8
    if zero == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(p.parameters, 8, nodes, cpu_offload=offload)
    else:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            p.parameters, p.largest_layer, 8, nodes, cpu_offload=offload, cpu_offload_params=False
        )
    assert abs(p.model_states_bytes - gpu) / gpu < 0.10


def deepspeed_printed_gib(capsys, option: str) -> float:
    """The per-GPU figure DeepSpeed's *_all_live estimator prints on the line of the given options."""
    for line in capsys.readouterr().out.splitlines():
        if line.strip().endswith(option):
            return float(re.findall(r"([\d.]+)GB", line)[1])
    raise AssertionError(f"no line ending in {option}")


def test_model_states_match_deepspeed_all_live_estimators_on_a_real_model(capsys):
    torch.manual_seed(0)
    model = BertForPreTraining(get_config("base", vocab_size=30522))  # real storage: the estimators dedupe by pointer
    capsys.readouterr()
    estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=2)
    zero2 = deepspeed_printed_gib(capsys, "offload_optimizer=none")
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=8, num_nodes=2)
    zero3 = deepspeed_printed_gib(capsys, "offload_param=none, offload_optimizer=none, zero_init=1")
    ours2 = plan(PlanConfig(model="base", zero=2, gpus=16)).model_states_bytes / GiB
    ours3 = plan(PlanConfig(model="base", zero=3, gpus=16)).model_states_bytes / GiB
    assert abs(ours2 - zero2) / zero2 < 0.10 and abs(ours3 - zero3) / zero3 < 0.10


def test_activations_match_the_megatron_formula_and_flash_drops_the_quadratic_term():
    # Korthikanti et al. 2022: a transformer layer keeps s·b·h·(34 + 5·a·s/h) bytes in 16-bit without flash.
    config = get_config("large")
    cfg = PlanConfig(model="large", max_len=512, micro_batch=8, precision="bf16")
    b, s, h, a, layers = 8, 512, 1024, 16, 24
    math_full, math_ckpt = activation_bytes(config, cfg, flash=False)
    flash_full, flash_ckpt = activation_bytes(config, cfg, flash=True)
    megatron_layer = s * b * h * (34 + 5 * a * s / h)
    per_layer = (math_full - math_ckpt + layers * s * b * h * 2) / (layers - 1)  # full-ckpt = (L-1)·layer - L·input
    assert abs(per_layer - megatron_layer) / megatron_layer < 0.01
    assert math_full - flash_full == pytest.approx(layers * (b * a * s * s * 5 - b * a * s * 4))
    assert flash_ckpt < flash_full / 4


def verdicts(out: str) -> dict[str, tuple[float, float, str, float, int]]:
    """{"without checkpointing": (total GiB, budget GiB, verdict, headroom GiB, headroom %), "with ...": (...)}."""
    found = re.findall(
        r"^(with(?:out)? checkpointing): ([\d.]+) GiB of ([\d.]+) GiB -> (fits|does NOT fit), "
        r"headroom (-?[\d.]+) GiB \((-?\d+)%\)$",
        out,
        re.M,
    )
    return {
        name: (float(total), float(budget), verdict, float(headroom), int(percent))
        for name, total, budget, verdict, headroom, percent in found
    }


def check_verdicts(out: str, p, budget_gib: float) -> None:
    """Both verdict lines state the plan's totals against the budget: fit, headroom in GiB and in percent."""
    lines = verdicts(out)
    expected = {
        "without checkpointing": p.model_states_bytes + p.activations_bytes,
        "with checkpointing": p.model_states_bytes + p.activations_checkpointed_bytes,
    }
    assert set(lines) == set(expected)
    for name, total_bytes in expected.items():
        total, budget, verdict, headroom, percent = lines[name]
        total_gib = total_bytes / GiB
        assert total == pytest.approx(total_gib, abs=0.006) and budget == budget_gib
        assert verdict == ("fits" if total_gib <= budget_gib else "does NOT fit")
        assert headroom == pytest.approx(budget_gib - total_gib, abs=0.006)
        assert abs(percent - 100 * (budget_gib - total_gib) / budget_gib) <= 0.5


def test_fit_verdict_and_headroom(capsys):
    args = [
        "--model",
        "large",
        "--max-len",
        "512",
        "--micro-batch",
        "8",
        "--zero",
        "2",
        "--precision",
        "bf16",
        "--gpus",
        "64",
        "--gpu-memory",
        "80",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^large: 336\.2M parameters", out, re.M)
    check_verdicts(
        out, plan(PlanConfig(model="large", max_len=512, micro_batch=8, zero=2, precision="bf16", gpus=64)), 80
    )
    assert {verdict for _, _, verdict, _, _ in verdicts(out).values()} == {"fits"}
    assert main(["--model", "large", "--micro-batch", "256", "--zero", "0", "--gpus", "1", "--gpu-memory", "16"]) == 0
    out = capsys.readouterr().out
    check_verdicts(out, plan(PlanConfig(model="large", micro_batch=256, zero=0, gpus=1, gpu_memory_gib=16)), 16)
    assert {verdict for _, _, verdict, _, _ in verdicts(out).values()} == {"does NOT fit"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "huge"], "unknown model"),
        (["--zero", "1", "--offload"], "needs --zero 2 or 3"),
        (["--max-len", "1024"], "outside"),
    ],
)
def test_user_errors_exit_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err
