from bertds.engine.config import load_ds_config, resolve_batch_sizes
from bertds.engine.step import micro_step

__all__ = ["load_ds_config", "micro_step", "resolve_batch_sizes"]
