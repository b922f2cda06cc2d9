"""switchjax: Switch Transformers (sparse T5 Mixture-of-Experts) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
  name="switchjax",
  version="0.1.0",
  description="Switch Transformers in JAX/Flax: routers, expert parallelism, HF conversion, "
  "pretraining.",
  long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
  long_description_content_type="text/markdown",
  # The presets live in the top-level configs/ (one file per preset) and install as the
  # package switchjax.configs, so `--config=NAME` works from any install, not only a checkout.
  packages=find_packages(include=["switchjax", "switchjax.*"]) + ["switchjax.configs"],
  package_dir={"switchjax.configs": "configs"},
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    # sentencepiece 0.2.3's sentencepiece_model_pb2 needs protobuf >= 7.36 at run time, which
    # Apache Beam (the data extra) forbids (< 7); 0.2.0-0.2.2 load under protobuf 5, 6 and 7.
    # transformers reads T5 tokenizers through that module.
    "sentencepiece>=0.2.0,<0.2.3",
    "protobuf",
    "numpy>=2.0",
    "safetensors>=0.4",
    "tensorboardX>=2.6",
    "tqdm",
    "pyarrow",
  ],
  extras_require={
    # XLA's TPU compiler (libtpu, matched to jax), to compile for TPU slices on any machine
    # (scripts/simulate_pod.py --topology, scripts/fit_presets.py) and to run on TPUs.
    "tpu": ["jax[tpu]>=0.10.2"],
    # Corpus preparation as an Apache Beam job (scripts/prepare_data.py; the DirectRunner's
    # local processes by default, Dataflow/Flink/Spark through Beam's own options).
    "data": ["apache-beam>=2.70"],
    "test": [
      "pytest>=8",
      "pytest-xdist>=3.5",
      "transformers>=5.18",
      "torch==2.13.0",
      "safetensors",
      "matplotlib>=3.8",
      "nbformat>=5.9",
      # The ruff minor version the tree is formatted and linted with (0.6 reformats files and
      # reports UP038); keep .pre-commit-config.yaml's pin the same.
      "ruff>=0.17,<0.18",
      # Type checks of the MoE core ([tool.mypy] in pyproject.toml); new mypy versions report
      # new errors, so move to one deliberately.
      "mypy>=2.4,<2.5",
    ],
  },
)
