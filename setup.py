from setuptools import setup

setup(
    name="nuwa3dna",
    version="0.1.0",
    description="NÜWA 3D Nearby Attention (3DNA): fused Triton kernels, a fast CPU path and a small NÜWA",
    packages=["nuwa3dna", "nuwa3dna.kernels", "nuwa3dna.kernels.cpu", "nuwa3dna.kernels.triton",
              "nuwa3dna.model", "nuwa3dna.model.cli"],
    package_dir={
        "nuwa3dna": "nuwa3dna",
        "nuwa3dna.kernels": "kernels",
        "nuwa3dna.model": "model",
    },
    package_data={"nuwa3dna.model": ["checkpoints/*/*.json", "checkpoints/*/*.safetensors"]},
    python_requires=">=3.9",
    # torch is pinned by .ci/run (CPU build from local disk); a looser range here
    # lets GPU users keep their own CUDA build.
    # Triton wheels exist only for Linux on x86_64/aarch64; elsewhere (macOS, Windows)
    # the package installs without it and runs the CPU path.
    install_requires=["torch>=2.4",
                      "triton>=3.0; platform_system == 'Linux' and "
                      "(platform_machine == 'x86_64' or platform_machine == 'aarch64')",
                      "numpy", "einops"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "model": ["tqdm", "pillow", "safetensors"],
    },
)
