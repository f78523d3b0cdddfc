"""Packaging for fusedtx.

The Triton kernels live in the top-level folder ``kernels/`` and the benchmarks in ``bench/``; they are
installed as the subpackages ``fusedtx.kernels`` and ``fusedtx.bench`` (``package_dir`` maps them), so
nothing named plain ``kernels`` or ``bench`` reaches site-packages and ``fusedtx bench`` works from any
folder. Always import them as ``fusedtx.kernels`` and ``fusedtx.bench``. ``bench/results/`` (committed GPU
results) is not package data.
"""

from setuptools import setup

setup(
    name="fusedtx",
    version="0.1.0",
    description="Fused Triton kernels for transformers and vision transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["fusedtx", "fusedtx.nn", "fusedtx.ops", "fusedtx.highres", "fusedtx.kernels", "fusedtx.bench"],
    package_dir={"fusedtx.kernels": "kernels", "fusedtx.bench": "bench"},
    package_data={"fusedtx.kernels": ["configs/*.json"]},  # tuned configs shipped per device (fusedtx tune)
    # torch 2.11 (the GPU machine) through 2.14 (CI); Triton 3.6 through 3.9 ships beside them.
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6,<3.10; platform_system == 'Linux'",
        "tqdm>=4.60",  # fusedtx profile's progress bar
        "platformdirs>=3",  # where fusedtx tune keeps tuned configs (the user cache dir)
        "safetensors>=0.4",  # fusedtx profile --weights FILE.safetensors
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "ruff>=0.5",
            "timm>=1.0",
            "torchvision",
            "transformers>=4.51",  # AttentionInterface (fusedtx.swap of HF models)
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["fusedtx = fusedtx.cli:main"]},
)
