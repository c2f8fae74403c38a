#!/usr/bin/env python
"""expedit-d2: training-free token clustering/reconstruction for Detectron2 backbones."""
from setuptools import find_packages, setup

setup(
    name="expedit-d2",
    version="0.1.0",
    description="Expediting large vision transformers for dense prediction in Detectron2, "
    "without fine-tuning",
    packages=find_packages(include=("expedit_d2", "expedit_d2.*")),
    python_requires=">=3.10",
    install_requires=["torch>=2.0", "fvcore", "numpy"],
    # ONNX export (tools/export_onnx.py and its tests): pip install -e .[onnx] (tools/install.sh does)
    extras_require={"onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"]},
)
