"""Window geometry of 3DNA (re-exported from ``nuwa3dna.kernels.geometry``, where the backends use it)."""
from nuwa3dna.kernels.geometry import (  # noqa: F401
    Extent, Grid, centre, centre_int, count_visible, grid_coords, key_range, query_range, resolve_extent,
    visible)
