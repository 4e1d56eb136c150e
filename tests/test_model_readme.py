"""The README's Python API example runs as written (on a tiny random pipeline in place of the shipped one)."""
import os
import re

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _api_block() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, app_config, one_thread):
    from nuwa3dna.model.pipeline import NuwaPipeline
    torch.manual_seed(0)
    tiny = NuwaPipeline(config=app_config())
    calls = []
    real_generate = NuwaPipeline.generate

    def generate(self, task, **kw):
        calls.append(task)
        return real_generate(self, task, **{**kw, "progress": False})

    monkeypatch.setattr(NuwaPipeline, "load", classmethod(lambda cls, directory=None, map_location="cpu": tiny))
    monkeypatch.setattr(NuwaPipeline, "generate", generate)
    monkeypatch.chdir(tmp_path)
    code = _api_block()
    assert "NuwaPipeline.load()" in code
    exec(compile(code, "README.md (Python API)", "exec"), {})
    assert sorted(set(calls)) == sorted(("t2i", "s2i", "i2i", "ti2i", "t2v", "s2v", "v2v", "tv2v"))
    assert (tmp_path / "t2v.gif").is_file() and (tmp_path / "t2i_1.png").is_file()

