"""Runs launcher/pretrain.py with a fault injected from outside the product: SIGKILL at the moment ``latest``
would be moved to the checkpoint tag named in argv[1] (every file of that checkpoint already written).

    python tests/crash_before_latest.py step00000010 --output-dir ... (pretrain.py's flags)
"""

import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    tag, sys.argv = sys.argv[1], [str(REPO / "launcher" / "pretrain.py"), *sys.argv[2:]]
    replace = os.replace

    def replace_or_die(src, dst, *args, **kwargs):
        if Path(dst).name == "latest" and Path(src).read_text().strip() == tag:
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = replace_or_die
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
