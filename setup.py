import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# the one place the version is written is minimoe/__init__.py (`minimoe.__version__`)
INIT = (HERE / "minimoe" / "__init__.py").read_text(encoding="utf-8")
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT, re.M).group(1)

setup(
    name="minimoe",
    version=VERSION,
    description="A from-scratch NumPy GPT-style Mixture-of-Experts language model with hand-written backward passes",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # The built lesson notebooks (lessons/*.ipynb, their .npz reference values and the READMEs) ship
    # as package data (the .py sources come along as the package's modules), so that
    # `python -m minimoe.lessons copy DIR` and `... student DIR` work from an installed wheel.
    packages=find_packages(include=["minimoe", "minimoe.*"]) + ["minimoe.lessons.notebooks"],
    package_dir={"minimoe.lessons.notebooks": "lessons"},
    package_data={"minimoe.lessons.notebooks": ["*.ipynb", "*.npz", "*.md"]},
    install_requires=["numpy>=1.24"],
    extras_require={
        # CuPy wheels are built per CUDA major version: `gpu` is CUDA 12.x (cupy-cuda12x),
        # `gpu-cuda13` is CUDA 13.x. Pick the one your NVIDIA driver supports (nvidia-smi tells).
        "gpu": ["cupy-cuda12x>=13"],
        "gpu-cuda13": ["cupy-cuda13x>=14"],
        # Teachers: nbgrader's generate_assignment / autograde on the lesson notebooks.
        "teach": ["nbgrader>=0.9", "nbclient>=0.7", "nbformat>=5", "ipykernel"],
        "lessons": ["jupyter", "nbclient>=0.7", "nbformat>=5", "ipykernel", "matplotlib>=3.5", "tqdm"],
        "test": [
            "pytest>=7",
            "ruff==0.17.6",  # pinned: the formatter check in .ci/run must not drift
            "nbclient>=0.7",
            "nbformat>=5",
            "ipykernel",
            "matplotlib>=3.5",
            # tests/test_wheel.py builds the wheel offline (no build isolation) with these
            "build",
            "setuptools>=70.1",
        ],
        # Training on P processes (`mpiexec -n P python -m minimoe train`, docs/distributed.md):
        # mpi4py and an MPI from the package index (the MPICH wheel; Intel MPI's on Windows, where
        # there is none). A cluster's own MPI works too: then install mpi4py alone.
        "dist": ["mpi4py>=4", "mpich; sys_platform != 'win32'", "impi-rt; sys_platform == 'win32'"],
        # Only for comparisons (parity tests, `minimoe bench --vs-torch`); never needed to train.
        "hf": ["safetensors", "tokenizers"],
        "compare": ["torch", "transformers", "safetensors"],
    },
    entry_points={"console_scripts": ["minimoe=minimoe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
