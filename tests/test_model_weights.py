"""model/weights.py: weights and configs are written atomically, as safetensors + JSON.

A save that fails half-way (here: ``os.replace`` or the write itself raising)
must leave the previous file untouched and no temporary file behind.
"""
import json
import os

import pytest
import torch

from nuwa3dna.model import weights
from nuwa3dna.model.config import tiny_config
from nuwa3dna.model.pipeline import CONFIG_FILE, WEIGHTS_FILE, NuwaPipeline


def test_round_trip_and_no_leftovers(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    weights.save_tensors(str(tmp_path / "w.safetensors"), t, {"k": "v"})
    weights.save_json(str(tmp_path / "c.json"), {"x": [1, 2]})
    assert sorted(os.listdir(tmp_path)) == ["c.json", "w.safetensors"]
    back = weights.load_tensors(str(tmp_path / "w.safetensors"))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert oct(os.stat(tmp_path / "c.json").st_mode & 0o777) == oct(os.stat(tmp_path / "w.safetensors").st_mode
                                                                    & 0o777)


@pytest.mark.parametrize("failing", ["replace", "write"])
def test_failed_save_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch, failing):
    path = tmp_path / "w.safetensors"
    weights.save_tensors(str(path), {"a": torch.zeros(4)})
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")
    if failing == "replace":
        monkeypatch.setattr(weights.os, "replace", boom)
    else:
        monkeypatch.setattr(weights.os, "fsync", boom)       # after part of the bytes went out
    with pytest.raises(OSError, match="disk full"):
        weights.save_tensors(str(path), {"a": torch.ones(1000)})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_pipeline_save_is_atomic(tmp_path, monkeypatch):
    """NuwaPipeline.save goes through the helper: a failed save leaves no file at all."""
    monkeypatch.setattr(weights.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        NuwaPipeline(config=tiny_config()).save(str(tmp_path / "ckpt"))
    assert os.listdir(tmp_path / "ckpt") == []
    monkeypatch.undo()
    NuwaPipeline(config=tiny_config()).save(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted([CONFIG_FILE, WEIGHTS_FILE])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train that stage first"):
        weights.load_module(torch.nn.Linear(2, 2), str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        weights.load_tensors(str(tmp_path / "bad.safetensors"))
    weights.save_module(torch.nn.Linear(2, 3), str(tmp_path / "lin.safetensors"), {"note": [1]})
    with pytest.raises(ValueError, match="does not match"):
        weights.load_module(torch.nn.Linear(2, 2), str(tmp_path / "lin.safetensors"))
