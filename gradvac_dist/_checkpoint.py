"""Checkpoint files: written atomically, read without executing code.

``torch.save`` straight onto the final path leaves a truncated file behind if the job dies while
writing; ``torch.load`` without ``weights_only`` can execute code from the file. Here a file is
written to a temporary name in the same folder, flushed to disk, then renamed over the target
(an atomic step on POSIX), and read back with ``weights_only=True``; a truncated or corrupt file is
refused with a ``ValueError`` and nothing is loaded.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(state_dict: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes ``state_dict`` (e.g. ``{"model": ..., "gradvac": state.state_dict()}``) to ``path`` atomically.

    Either the previous file stays whole or the new one is complete: never a half-written file.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"save_checkpoint expects a dict (a state_dict), got {type(state_dict).__name__}.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """Reads a file written by :func:`save_checkpoint` (or ``torch.save``) without running code from it.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is truncated, corrupt, or holds objects other than tensors and
            plain containers (``weights_only=True`` refuses them).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}.")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"checkpoint {path!r} is truncated, corrupt, or not a plain tensor checkpoint "
            f"(loaded with weights_only=True): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(data).__name__}, expected a dict (a state_dict).")
    return data
