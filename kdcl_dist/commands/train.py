"""KD / KD-CL / KD-CL-SR training with DeepSpeed ZeRO (see docs/training.md).

Single process:  kdcl-dist train --curriculum runs/cur --student runs/models/student \\
                     --teacher runs/models/teacher --out runs/train
Several ranks:   torchrun --nproc_per_node 2 -m kdcl_dist train ...   (or: deepspeed --num_gpus 2 ...)
Every option is a field of TrainConfig (kdcl_dist/train.py): a flag, a `train:` key of --config FILE
or a KEY=VALUE override such as warmup_steps=50. --print-config shows the resolved result.
"""

from __future__ import annotations

from kdcl_dist.config import add_config_args, add_options, flag_fields, resolve_args
from kdcl_dist.train import TrainConfig

_LENGTH = "length (see docs/training.md for the epochs semantics)"

# argparse dest -> TrainConfig field: one flag per field, generated from TrainConfig
FLAGS: dict[str, str] = flag_fields(TrainConfig)


def add_arguments(parser):
    add_options(parser, TrainConfig, "train", groups={"steps": _LENGTH, "epochs": _LENGTH})
    add_config_args(parser, "train")


def run(args) -> int:
    from kdcl_dist.train import train

    cfg = resolve_args(args)
    if (
        cfg.out
    ):  # every rank, before the process group and any work (train.out may come from --config)
        from kdcl_dist.utils import check_output_path

        check_output_path(cfg.out, "dir")
    summary = train(cfg)
    return 0 if summary else 1
