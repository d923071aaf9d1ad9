"""Runs launcher/pretrain.py with an exception injected from outside the product: the rank given in argv[1] raises
in its micro-step number argv[2] (counted from 1 in this process), the other ranks train on.

    python tests/fail_on_rank.py 1 3 --output-dir ... (pretrain.py's flags)
"""

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    launcher_flags = [a for a in sys.argv[1:] if a.startswith("--local_rank")]  # the deepspeed launcher puts it first
    rank, at, *flags = [a for a in sys.argv[1:] if a not in launcher_flags]
    at, sys.argv = int(at), [str(REPO / "launcher" / "pretrain.py"), *launcher_flags, *flags]
    sys.path.insert(0, str(REPO))
    from bertds.engine import train

    micro_step, calls = train.micro_step, []

    def failing_micro_step(*args, **kwargs):
        calls.append(1)
        if os.environ.get("RANK") == rank and len(calls) == at:
            raise RuntimeError(f"injected failure on rank {rank} in micro-step {at}")
        return micro_step(*args, **kwargs)

    train.micro_step = failing_micro_step
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
