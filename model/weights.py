"""Weights and configs on disk, written one way: safetensors + JSON, never pickle, always atomic.

``atomic_write`` puts the bytes in a temporary file in the target's folder
and then ``os.replace``-s it over the target, so a reader (or a run killed
mid-save) sees either the old file or the new one, never a partial one; the
temporary file is removed when writing fails. Every writer of weights and
configs (``NuwaPipeline.save``, the training stages, the training state)
goes through ``save_tensors`` / ``save_json`` here.

Untested: file systems where ``os.replace`` is not atomic (some network mounts).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Union

import torch
from torch import nn


def _default_mode() -> int:
    """0o666 minus the process umask: what ``open(path, "w")`` would have given."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str, data: Union[bytes, str]) -> str:
    """Write ``data`` (str is UTF-8 encoded) to ``path`` via a temporary file and ``os.replace``."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def module_tensors(module: nn.Module, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU copies (what safetensors stores)."""
    return {prefix + k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    from safetensors.torch import save
    return atomic_write(path, save(tensors, metadata=metadata))


def save_json(path: str, obj) -> str:
    """``obj`` as JSON (indent 1); a str is written as it is (already JSON)."""
    return atomic_write(path, obj if isinstance(obj, str) else json.dumps(obj, indent=1))


def load_tensors(path: str, device: str = "cpu", missing: str = "") -> Dict[str, torch.Tensor]:
    """Read a safetensors file; a missing file is FileNotFoundError (``missing`` appended to
    the message), an unreadable one ValueError."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing weights file {path!r}{missing}")
    try:
        return load_file(path, device=str(device))
    except Exception as e:             # safetensors raises its own error types
        raise ValueError(f"corrupt or truncated weights file {path!r}: {e}") from None


def save_module(module: nn.Module, path: str, meta: Optional[dict] = None) -> str:
    """The module's weights, with ``meta`` values stored JSON-encoded in the file's metadata."""
    return save_tensors(path, module_tensors(module), {k: json.dumps(v) for k, v in (meta or {}).items()})


def load_module(module: nn.Module, path: str) -> None:
    state = load_tensors(path, missing=" (train that stage first)")
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights file {path!r} does not match the config: {str(e)[:300]}") from None
