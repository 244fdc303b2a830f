"""lseg-jax: Language-driven Semantic Segmentation (LSeg) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="lseg-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of LSeg (Li et al., ICLR 2022)",
    packages=find_packages(include=["lseg_jax", "lseg_jax.*", "configs"]),
    package_data={"lseg_jax.data": ["*.txt", "*.json", "class_names/*.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax",
        "orbax-checkpoint",
        "transformers",
        "ftfy",  # clip.tokenize's text cleaning (lseg_jax.text)
        "safetensors",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "tensorboard",  # tf.summary scalars of training runs
        "importlib_resources",  # Needed by tensorflow-datasets when building datasets.
        "ml_collections",
        "absl-py",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        # PyTorch interop (checkpoint import/export, the self-contained PyTorch LSeg).
        "torch": ["torch", "torchvision", "timm"],
        # Compiling for TPU slices on any machine (tools/benchmark.py --aot): libtpu, at
        # the JAX version it is built for.
        "tpu": ["jax[tpu]==0.10.2"],
        # The browser demo (tools/demo.py).
        "demo": ["gradio>=6,<7"],
        # The demo's tests drive it over HTTP (gradio_client) and in Chromium (selenium).
        "test": ["pytest", "pytest-xdist", "gradio>=6,<7", "gradio_client", "selenium>=4.11"],
    },
)
