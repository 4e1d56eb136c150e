"""The one list of 3DNA problems shared by tests, benchmarks and the README
(re-exported from ``nuwa3dna.kernels.problems``, where the AOT report uses it)."""
from nuwa3dna.kernels.problems import (TEST_PROBLEMS, WINDOW_PROBLEMS, WINDOW_WORKLOADS, WORKLOADS,  # noqa: F401
                                       Problem)
