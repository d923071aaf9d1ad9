"""bench/gpu_report.py --smoke: every check of the GPU report runs at toy sizes on this machine and reports."""

import json
import subprocess
import sys

from tests.conftest import REPO, launcher_env

EXPECTED = [
    "main job (tiny, d2l recipe)",
    "base seq128 bf16",
    "large seq128 fp16 ZeRO-2",
    "large seq512 bf16 ZeRO-2 + act. ckpt",
    "fp16 dynamic loss scaling (ZeRO-2)",
    "FusedLamb vs PyTorch LAMB",
    "fused MLM loss vs logits (bf16)",
    "2 ranks (base seq128 bf16)",
    "budget",
]


def test_smoke_report_runs_every_check_and_writes_its_table(tmp_path, wikitext_dir, cache_dir, prepared):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_report.py"),
            "--smoke",
            "--json",
            str(out),
            "--data-dir",
            str(wikitext_dir),
        ],
        cwd=REPO,
        env=launcher_env(cache_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == EXPECTED
    for name in EXPECTED:
        assert name in proc.stdout  # the printed table has a row per check
    assert report["smoke"] is True
    statuses = {name: c["status"] for name, c in checks.items()}
    on_cpu = report["device"] == "cpu"
    assert all(s == "pass" for name, s in statuses.items() if not (on_cpu and name.startswith("FusedLamb"))), statuses

    assert checks["main job (tiny, d2l recipe)"]["figures"]["pairs_per_s"] > 0
    for name in EXPECTED[1:4]:
        figures = checks[name]["figures"]
        assert figures["sequences_per_s"] > 0
        assert abs(figures["tokens_per_s"] - 64 * figures["sequences_per_s"]) < 1e-6 * figures["tokens_per_s"]
        assert figures["planned_memory_gib"] > 0 and figures["peak_memory_gib"] > 0
        assert checks[name]["setup_s"] > 0 and checks[name]["run_s"] > 0  # warm-up measured apart
    fp16 = checks["fp16 dynamic loss scaling (ZeRO-2)"]["figures"]
    assert 0 < fp16["skipped_steps"] < fp16["steps"] and fp16["final_scale"] < fp16["initial_scale"]
    mlm = checks["fused MLM loss vs logits (bf16)"]["figures"]
    assert mlm["loss_rel_diff"] < 1e-2 and mlm["grad_max_rel_diff"] < 5e-2
    lamb = checks["FusedLamb vs PyTorch LAMB"]
    assert lamb["figures"]["max_rel_update"] > 0
    if on_cpu:
        assert lamb["status"] == "skip" and "FusedLamb unavailable on cpu" in lamb["note"]
        assert checks["2 ranks (base seq128 bf16)"]["figures"]["backend"] == "gloo"


def test_bad_data_dir_is_one_error_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_report.py"), "--smoke", "--data-dir", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: --data-dir {tmp_path / 'missing'} is not a directory; pass the WikiText-2 directory"
    ]
