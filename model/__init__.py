"""NÜWA on NearbyAttention3D: tokenizers, encoder-decoder, tasks, sampling."""
