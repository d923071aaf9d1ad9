import contextlib
import sys

# DeepSpeed's logger writes to the sys.stdout of the moment it is imported, and importing it already logs (e.g.
# "Setting accelerator to CPU"): imported here, before any engine module, with stdout pointed at stderr, its
# messages never mix with the machine output (JSON) that bertds' command lines print on stdout.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401 - imported for the redirect above; the modules below use it

from bertds.engine.config import load_ds_config, resolve_batch_sizes
from bertds.engine.step import micro_step

__all__ = ["load_ds_config", "micro_step", "resolve_batch_sizes"]
