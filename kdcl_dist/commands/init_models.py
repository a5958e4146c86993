"""Write a freshly initialised teacher/student pair of HF masked-LM models, or check a pair.

  kdcl-dist init-models --preset tiny --tokenizer runs/tokenizer --out runs/models
      -> runs/models/teacher (tiny BERT) and runs/models/student (tiny DistilBERT), both
         saved with the tokenizer, from the preset's `models` section.
  kdcl-dist init-models --teacher PATH|NAME --student PATH|NAME
      -> check mode: refuses a pair whose vocabularies differ (KD compares distributions
         over one shared vocabulary), before any work starts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from kdcl_dist.config import add_config_args, option, resolve, write_resolved
from kdcl_dist.errors import UserError

_TINY_TEACHER = {"type": "bert", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}
_TINY_STUDENT = {"type": "distilbert", "hidden_size": 128, "num_layers": 2, "num_heads": 4,
                 "intermediate_size": 512}
_SPEC_KEYS = {"type", "hidden_size", "num_layers", "num_heads", "intermediate_size"}


@dataclass
class ModelsConfig:
    # Any: a preset may name pretrained models (strings) instead of architecture specs.
    teacher: Any = option(default_factory=lambda: dict(_TINY_TEACHER),
                          help="architecture spec {type, hidden_size, num_layers, num_heads, intermediate_size}")
    student: Any = option(default_factory=lambda: dict(_TINY_STUDENT), help="architecture spec (see teacher)")
    max_position_embeddings: int = option(512, min=8)
    seed: int = option(0, help="teacher uses seed, student seed + 1")


def add_arguments(p):
    p.add_argument("--tokenizer", help="tokenizer directory shared by both models (init mode)")
    p.add_argument("--out", help="output directory; writes <out>/teacher and <out>/student (init mode)")
    p.add_argument("--teacher", help="check mode: teacher model directory or hub name")
    p.add_argument("--student", help="check mode: student model directory or hub name")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace existing model directories")
    add_config_args(p)


def _check_spec(name: str, spec) -> dict:
    if isinstance(spec, str):
        raise UserError(f"models.{name}: {spec!r} names a pretrained model; init-models builds new models from "
                        "architecture specs (use --preset tiny), or check a pretrained pair with "
                        "`kdcl-dist init-models --teacher NAME --student NAME`")
    if not isinstance(spec, dict):
        raise UserError(f"models.{name}: expected a mapping with {', '.join(sorted(_SPEC_KEYS))}, got {spec!r}")
    missing = sorted(_SPEC_KEYS - set(spec))
    if missing:
        raise UserError(f"models.{name}: missing {', '.join(missing)} (allowed keys: {', '.join(sorted(_SPEC_KEYS))})")
    if spec["type"] not in ("bert", "distilbert"):
        raise UserError(f"models.{name}.type: {spec['type']!r} is not one of bert, distilbert")
    if spec["hidden_size"] % spec["num_heads"]:
        raise UserError(f"models.{name}: hidden_size {spec['hidden_size']} is not divisible by "
                        f"num_heads {spec['num_heads']}")
    return spec


def check_pair(teacher: str, student: str) -> str:
    """Refuse a teacher/student pair with different vocabularies; return a one-line summary."""
    from transformers import AutoConfig

    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import check_same_vocabulary

    tt, st = load_tokenizer(teacher), load_tokenizer(student)
    check_same_vocabulary(tt, st, teacher, student)
    sizes = []
    for name in (teacher, student):
        try:
            sizes.append(AutoConfig.from_pretrained(name).vocab_size)
        except (OSError, ValueError) as e:
            raise UserError(f"{name}: cannot read the model config ({str(e).splitlines()[0]})") from None
    if sizes[0] != sizes[1]:
        raise UserError(f"teacher {teacher} and student {student} have output layers of different sizes "
                        f"({sizes[0]} vs {sizes[1]}) although their tokenizers match; KD needs equal vocabularies")
    return f"ok: {teacher} and {student} share one vocabulary ({len(tt)} tokens, model vocab_size {sizes[0]})"


def run(args) -> int:
    if args.teacher or args.student:
        if not (args.teacher and args.student):
            raise UserError("--teacher and --student: check mode needs both")
        print(check_pair(args.teacher, args.student))
        return 0
    if not args.tokenizer or not args.out:
        raise UserError("init-models: pass --tokenizer DIR --out DIR (or --teacher/--student to check a pair)")
    from kdcl_dist.utils import check_output_path, make_temp_dir

    out = check_output_path(args.out, "dir")   # before loading anything
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import init_model_dir

    cfg = resolve(ModelsConfig, "models", preset=args.preset, config_file=args.config,
                  flags={"seed": args.seed}, overrides=args.overrides)
    specs = {"teacher": _check_spec("teacher", cfg.teacher), "student": _check_spec("student", cfg.student)}
    tok = load_tokenizer(args.tokenizer)
    for name in specs:
        if (out / name).exists() and not args.overwrite:
            raise UserError(f"{out / name}: already exists; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(specs.items()):
        tmp = make_temp_dir(out, f".tmp-{name}.")   # 0777 less the umask (mkdtemp's would be 0700)
        try:  # written under a temporary name, renamed when complete
            model = init_model_dir(spec, tok, tmp, seed=cfg.seed + i, max_positions=cfg.max_position_embeddings)
            if (out / name).exists():
                shutil.rmtree(out / name)
            tmp.rename(out / name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"{out / name}: {spec['type']} masked LM, {n / 1e6:.2f}M parameters, vocab {len(tok)}")
    write_resolved(cfg, out, "models")
    return 0
