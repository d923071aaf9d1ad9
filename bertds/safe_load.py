"""Reading torch files without running their code: torch's ``weights_only`` unpickler, which builds only tensors,
containers and allowlisted classes. Allowed beyond torch's defaults: the plain data classes DeepSpeed's optimizer
states hold (building them sets attributes, it calls nothing of the file). Anything else needs full unpickling,
which can run any code a file carries; bertds does that only for a user who passes ``--trust-checkpoint``.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from bertds.errors import UserError

TRUST_FLAG = "--trust-checkpoint"
MMAP_REFUSED = "mmap can only be used with files saved with"  # torch's message for its legacy (non-zip) format


def allowed_classes() -> list[type]:
    """DeepSpeed's classes in its ZeRO and fp16 optimizer states: dataclasses, an int enum, attribute bags."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(path: Path, map_location, mmap: bool):
    with torch.serialization.safe_globals([*allowed_classes()]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and MMAP_REFUSED in str(e)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)


def _unsafe_globals(path: Path) -> str:
    try:
        with torch.serialization.safe_globals([*allowed_classes()]):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError):  # a legacy-format file: torch's scanner reads only zip files
        names = []
    return ", ".join(sorted(names)) or "objects other than tensors"


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:160]


def problem(path: Path) -> str | None:
    """Why ``path`` cannot be read safely (it needs full unpickling, or it is damaged); None if it can. Maps the
    tensors instead of reading them, so it costs about a read of the file's pickle."""
    try:
        _load_weights_only(path, "cpu", mmap=True)
    except pickle.UnpicklingError:
        return (
            f"{path} holds {_unsafe_globals(path)}, which only full unpickling can build, and unpickling runs "
            f"any code a file carries; pass {TRUST_FLAG} only if you trust where this checkpoint comes from"
        )
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        return f"{path} is damaged (truncated or corrupt: {_first_line(e)})"
    return None


def load(path: Path, map_location="cpu", trust: bool = False):
    """The object torch saved in ``path``, read with the weights-only unpickler unless ``trust``; a file that needs
    full unpickling or is damaged is a UserError naming it."""
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False)
        return _load_weights_only(path, map_location, mmap=False)
    except pickle.UnpicklingError:
        reason = problem(path)
        raise UserError(reason or f"{path} cannot be read with the weights-only unpickler") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(
            f"{path} is damaged (truncated or corrupt: {_first_line(e)}); copy it again or use another checkpoint"
        ) from None
