"""nuwa3dna: NÜWA's 3D Nearby Attention (3DNA) with fused Triton kernels and a fast CPU path."""
from nuwa3dna.kernels.geometry import count_visible, resolve_extent
from nuwa3dna.module import NearbyAttention3D
from nuwa3dna.ops import nearby_attention
from nuwa3dna.reference import brute_force_nearby_attention, dense_nearby_attention, nearby_mask
from nuwa3dna.memory import clear_workspace, workspace_bytes
from nuwa3dna.merge import merge_attentions
from nuwa3dna import natten  # noqa: E402  (nuwa3dna.natten.na1d/na2d/na3d: NATTEN's functional API)

__all__ = [
    "nearby_attention", "NearbyAttention3D", "merge_attentions",
    "dense_nearby_attention", "brute_force_nearby_attention", "nearby_mask",
    "count_visible", "resolve_extent", "clear_workspace", "workspace_bytes", "natten",
]
__version__ = "0.1.0"
