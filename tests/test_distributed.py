"""The process group's start-up (bertds.distributed)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port, launcher_env

# What launcher/pretrain.py does first on launch rank 0, through the same error wrapper.
CHECK = (
    "from bertds.distributed import check_master_port; from bertds.errors import run_cli; "
    "raise SystemExit(run_cli(check_master_port))"
)


def check_port(port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_a_busy_master_port_is_one_error_line_and_exit_2():
    with socket.socket() as holder:  # another job listening on the rendezvous port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = check_port(port)
    assert busy.returncode == 2, busy.stderr
    errors = [line for line in busy.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: the master port {port} is in use")
    assert "pass another --master_port to the deepspeed launcher" in errors[0] and "Traceback" not in busy.stderr
    free = check_port(port)  # the same check passes once the port is free again
    assert free.returncode == 0, free.stderr


def test_a_two_rank_cpu_job_leaves_no_shared_memory_segment_and_its_shm_all_reduce_still_works(tmp_path, cache_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port())]
        + [str(REPO / "tests" / "shm_worker.py")],
        cwd=REPO,
        env=launcher_env(cache_dir, SHM_REPORT_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("rank*.json"))]
    assert [r["rank"] for r in reports] == [0, 1], proc.stdout[-3000:]
    for report in reports:
        assert report["world_size"] == 2 and report["sum"] == [3.0, 3.0, 3.0, 3.0]
        # DeepSpeed made and mapped both ranks' segments; their names were already gone while the job ran, so
        # not even kill -9 can leave them in /dev/shm
        assert report["mapped"] == [f"{segment} (deleted)" for segment in report["segments"]], report
        assert report["names_left"] == []
    assert not any(Path(segment).exists() for segment in reports[0]["segments"])
