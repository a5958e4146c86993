"""KD / KD-CL / KD-CL-SR training with DeepSpeed ZeRO (see docs/training.md).

Single process:  kdcl-dist train --curriculum runs/cur --student runs/models/student \\
                     --teacher runs/models/teacher --out runs/train
Several ranks:   torchrun --nproc_per_node 2 -m kdcl_dist train ...   (or: deepspeed --num_gpus 2 ...)
Settings without a flag: --config FILE (section `train:`) or overrides such as warmup_steps=50.
"""

from __future__ import annotations

from kdcl_dist.config import add_config_args, resolve

# flag -> TrainConfig field
FLAGS = {
    "curriculum": "curriculum", "student": "student", "teacher": "teacher", "out": "out",
    "order": "order", "reliance": "reliance", "lambda": "lambda_", "temperature": "temperature",
    "global_batch": "global_batch", "micro_batch": "micro_batch", "steps": "steps", "epochs": "epochs",
    "lr": "lr", "ds_config": "ds_config", "teacher_hosting": "teacher_hosting", "save_every": "save_every",
    "keep": "keep", "resume": "resume", "seed": "seed", "kd_positions": "kd_positions",
    "num_workers": "num_workers", "extend_steps": "extend_steps", "allow_sr_any_order": "allow_sr_any_order",
    "allow_new_head": "allow_new_head",
    "progress": "progress", "wandb": "wandb", "wandb_project": "wandb_project", "wandb_mode": "wandb_mode",
}


def add_arguments(parser):
    a = parser.add_argument
    a("--curriculum", help="curriculum directory (curriculum.json, order_scores.npy, shards)")
    a("--student", help="student model directory or hub name (its tokenizer is used)")
    a("--teacher", help="teacher model directory or hub name; omit for student-only MLM (--reliance none)")
    a("--out", help="output directory")
    a("--order", help="sequential | reverse | random | pacing-linear | pacing-root | pacing-exp")
    a("--reliance", help="none | constant | sr-paper | sr-minmax | sr-sample | sr-rank (variant: λ rises with the curriculum rank)")
    a("--lambda", dest="lambda", type=float, help="λ of the constant schedule")
    a("--temperature", type=float, help="KD temperature τ")
    a("--global-batch", dest="global_batch", type=int, help="samples per optimizer step (all ranks)")
    a("--micro-batch", dest="micro_batch", type=int, help="samples per forward per rank")
    g = parser.add_argument_group("length (see docs/training.md for the epochs semantics)")
    g.add_argument("--steps", type=int, help="optimizer steps, at least 1 (unset: from --epochs)")
    g.add_argument("--epochs", type=int, help="epochs over the curriculum, at least 1 (unset: one epoch, or as many "
                   "as --steps needs)")
    a("--lr", type=float, help="peak learning rate")
    a("--ds-config", dest="ds_config", help="DeepSpeed config: a packaged name (zero2_bf16; see docs/training.md) or a JSON file")
    a("--teacher-hosting", dest="teacher_hosting", help="replicated | zero3")
    a("--save-every", dest="save_every", type=int, help="checkpoint every N steps")
    a("--keep", type=int, help="complete checkpoints to keep")
    a("--resume", help="auto | none | PATH")
    a("--extend-steps", dest="extend_steps", action="store_true", default=None,
      help="resume with a larger --steps/--epochs than the checkpoint's; the lr schedule is extended from the "
           "resume step (docs/training.md)")
    a("--allow-new-head", dest="allow_new_head", action="store_true", default=None,
      help="accept a teacher without MLM head (a freshly initialised head gives noise teacher targets)")
    a("--allow-sr-any-order", dest="allow_sr_any_order", action="store_true", default=None,
      help="allow --reliance sr-paper with --order random/reverse (refused by default: λ is ~0 there)")
    a("--seed", type=int)
    a("--kd-positions", dest="kd_positions", help="masked (default) | all")
    a("--num-workers", dest="num_workers", type=int, help="DataLoader workers per rank")
    a("--no-progress", dest="progress", action="store_false", default=None,
      help="no progress bar (shown only on a terminal anyway); the periodic progress line stays in the log")
    a("--wandb", action="store_true", default=None, help="also log to Weights & Biases (docs/training.md)")
    a("--wandb-project", dest="wandb_project", help="W&B project (default kdcl-dist)")
    a("--wandb-mode", dest="wandb_mode", help="online | offline | disabled (default: $WANDB_MODE, else online)")
    add_config_args(parser)


def run(args) -> int:
    from kdcl_dist.train import TrainConfig, train

    flags = {field: getattr(args, flag) for flag, field in FLAGS.items()}
    cfg = resolve(TrainConfig, "train", preset=args.preset, config_file=args.config, flags=flags,
                  overrides=args.overrides)
    if cfg.out:   # every rank, before the process group and any work (train.out may come from --config)
        from kdcl_dist.utils import check_output_path

        check_output_path(cfg.out, "dir")
    summary = train(cfg)
    return 0 if summary else 1
