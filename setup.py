"""forvalue: forward-only data valuation (For-Value) for fine-tuning LLMs."""

import re

from setuptools import setup

SUBPACKAGES = ("engine", "kernels", "bindings", "bench")

setup(
    name="forvalue",
    version=re.search(r'"(.+)"', open("engine/version.py").read()).group(1),
    description="Forward-only data valuation (For-Value) for fine-tuning LLMs and VLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[f"forvalue.{name}" for name in SUBPACKAGES],
    package_dir={f"forvalue.{name}": name for name in SUBPACKAGES},
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "safetensors>=0.4",
        "gguf>=0.10",
        "accelerate>=1.0",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "psutil>=5.9",
        "grpcio>=1.60",
        "grpcio-health-checking>=1.60",
        "grpcio-reflection>=1.60",
        "protobuf>=4.25",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        "lora": ["peft>=0.13"],
        "data": ["datasets>=2.14"],
        "test": ["pytest>=8", "hypothesis>=6", "triton==3.6.0", "peft>=0.13", "datasets>=2.14",
                 "grpcio-tools>=1.60", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["forvalue=forvalue.bindings.cli:main"]},
)
