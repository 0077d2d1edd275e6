"""Build megatron-qwen and its C++ extension (`megatron_qwen._C`, csrc/) with pybind11."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "megatron_qwen._C",
    sorted(__import__("glob").glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3"],
)

setup(
    name="megatron-qwen",
    version="0.1.0",
    description="Megatron-style 3D-parallel trainer for the Qwen model family",
    packages=find_packages(include=["megatron_qwen", "megatron_qwen.*"]),
    package_data={"megatron_qwen": ["../configs/*.yaml"], "megatron_qwen.plan": ["gpus.yaml"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    # The metadata lives here rather than in pyproject's [project] table, so the command is declared here too.
    entry_points={"console_scripts": ["megatron-qwen = megatron_qwen.cli.main:console"]},
    python_requires=">=3.10",
    install_requires=["torch", "megatron-core", "numpy", "pyyaml", "tiktoken", "safetensors", "psutil", "wandb",
                      "matplotlib", "pyarrow", "zstandard"],
)
