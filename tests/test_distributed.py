"""The process group's start-up (bertds.distributed)."""

import os
import socket
import subprocess
import sys

from tests.conftest import REPO

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
