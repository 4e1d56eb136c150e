"""NÜWA on NearbyAttention3D: tokenizers, encoder-decoder, the eight tasks, sampling with a KV cache.

Start with ``NuwaPipeline`` (pipeline.py) and ``NuwaConfig`` (config.py);
the task formations are documented in tasks.py. Tests: tests/test_model_*.py;
sampling speed: benchmarks/test_bench_sampling.py. What each part leaves
untested is listed in its module docstring.
"""
from nuwa3dna.model.config import NuwaConfig
from nuwa3dna.model.nuwa import Nuwa
from nuwa3dna.model.pipeline import NuwaPipeline
from nuwa3dna.model.sampling import sample_tokens
from nuwa3dna.model.tasks import TASKS
from nuwa3dna.model.tokenizers import ByteTextTokenizer, SketchTokenizer, VQTokenizer

__all__ = ["NuwaConfig", "Nuwa", "NuwaPipeline", "TASKS", "VQTokenizer", "SketchTokenizer",
           "ByteTextTokenizer", "sample_tokens"]
