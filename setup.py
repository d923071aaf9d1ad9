from setuptools import find_packages, setup

setup(
    name="bertds",
    version="0.1.0",
    description="Distributed BERT pretraining (MLM + NSP) on DeepSpeed",
    packages=find_packages(include=["bertds", "bertds.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "datasets>=3.0",
        "tokenizers>=0.19",
        "sentencex>=1.0",  # sentence splitting of untokenized text (bert recipe)
        "numpy",
        "tqdm",
        "matplotlib",
        "wandb",
    ],
    extras_require={
        # CPU machines: the pinned CPU build (an unpinned torch pulls a multi-GB CUDA build).
        "cpu": ["torch==2.13.0"],
        "test": ["pytest>=8"],
        # Hugging Face export/import (python -m bertds.export, --init-from-hf). The tests load exports with the
        # newest transformers and with 4.57 (.ci/run's second environment), so the range starts there.
        "hf": ["transformers>=4.57", "safetensors", "huggingface_hub", "accelerate"],
    },
)
