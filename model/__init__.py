"""NÜWA on NearbyAttention3D: tokenizers, encoder-decoder, the eight tasks, sampling with a KV cache.

Start with ``NuwaPipeline`` (pipeline.py) and ``NuwaConfig`` (config.py);
the task formations are documented in tasks.py. Tests: tests/test_model_*.py;
sampling speed: benchmarks/test_bench_sampling.py. What each part leaves
untested is listed in its module docstring.
"""
from .config import NuwaConfig
from .nuwa import Nuwa
from .pipeline import NuwaPipeline
from .sampling import sample_tokens
from .tasks import TASKS
from .tokenizers import ByteTextTokenizer, SketchTokenizer, VQTokenizer

__all__ = ["NuwaConfig", "Nuwa", "NuwaPipeline", "TASKS", "VQTokenizer", "SketchTokenizer",
           "ByteTextTokenizer", "sample_tokens"]
