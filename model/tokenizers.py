"""The three tokenizers of NÜWA (re-exported from ``vq`` and ``text``; see those modules,
including what they leave untested)."""
from nuwa3dna.model.text import NONE_ID, PAD_ID, TEXT_VOCAB, ByteTextTokenizer
from nuwa3dna.model.vq import SketchTokenizer, VectorQuantizer, VQTokenizer

__all__ = ["VQTokenizer", "SketchTokenizer", "VectorQuantizer", "ByteTextTokenizer",
           "PAD_ID", "NONE_ID", "TEXT_VOCAB"]
