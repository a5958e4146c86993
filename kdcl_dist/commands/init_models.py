"""Write a freshly initialised teacher/student pair of HF masked-LM models, or check a pair.

kdcl-dist init-models --preset tiny --tokenizer runs/tokenizer --out runs/models
    -> runs/models/teacher (tiny BERT) and runs/models/student (tiny DistilBERT), both
       saved with the tokenizer, from the preset's `models` section.
kdcl-dist init-models --teacher PATH|NAME --student PATH|NAME
    -> check mode: refuses a pair whose vocabularies differ (KD compares distributions
       over one shared vocabulary), before any work starts.
kdcl-dist init-models --student-from-teacher minilm --layers 3 [--student-arch distilbert|teacher] --out DIR
    -> DIR: a student made from the teacher (embeddings, layers 0, k, 2k, ... with k = L // N,
       the MLM head when the teacher has one) with the teacher's tokenizer (docs/real_models.md).
kdcl-dist init-models --preset minilm --out runs/models
    -> a preset naming a pretrained teacher (`teacher: minilm`) and a student
       `{from_teacher: true, layers: 3, arch: distilbert}`: <out>/teacher is the pretrained model
       (its tokenizer beside it), <out>/student is built from it; --tokenizer is not used.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcl_dist.config import add_config_args, add_options, option, resolve_args, write_resolved
from kdcl_dist.errors import UserError
from kdcl_dist.progress import PROGRESS_HELP, add_progress_flag, quiet_libraries

_TINY_TEACHER = {
    "type": "bert",
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 512,
}
_TINY_STUDENT = {
    "type": "distilbert",
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "intermediate_size": 512,
}
_SPEC_KEYS = {"type", "hidden_size", "num_layers", "num_heads", "intermediate_size"}


@dataclass
class ModelsConfig:
    # Any: a preset may name pretrained models (strings) instead of architecture specs.
    teacher: Any = option(
        default_factory=lambda: dict(_TINY_TEACHER),
        help="architecture spec {type, hidden_size, num_layers, num_heads, intermediate_size}",
    )
    student: Any = option(
        default_factory=lambda: dict(_TINY_STUDENT), help="architecture spec (see teacher)"
    )
    max_position_embeddings: int = option(
        512, help="position embeddings of both models (longest sequence)", min=8
    )
    seed: int = option(0, help="teacher uses seed, student seed + 1")


def add_arguments(p):
    p.add_argument("--tokenizer", help="tokenizer directory shared by both models (init mode)")
    p.add_argument(
        "--out", help="output directory; writes <out>/teacher and <out>/student (init mode)"
    )
    p.add_argument("--teacher", help="check mode: teacher model directory or hub name")
    p.add_argument("--student", help="check mode: student model directory or hub name")
    p.add_argument("--overwrite", action="store_true", help="replace existing model directories")
    add_progress_flag(p, PROGRESS_HELP + "; also the download and loading bars of HF libraries")
    p.add_argument(
        "--student-from-teacher",
        dest="student_from_teacher",
        metavar="TEACHER",
        help="build a student from this teacher (directory, hub name, pkg:NAME or minilm) into --out",
    )
    p.add_argument(
        "--layers",
        type=int,
        help="--student-from-teacher: student layers N (teacher layers 0, k, 2k, ... "
        "with k = L // N are copied)",
    )
    p.add_argument(
        "--student-arch",
        dest="student_arch",
        default="distilbert",
        choices=("distilbert", "teacher"),
        help="--student-from-teacher: DistilBERT (BERT weights mapped to DistilBERT names) or the "
        "teacher's own architecture",
    )
    add_options(
        p, ModelsConfig, "models", exclude=("teacher", "student")
    )  # specs: preset/--config/overrides
    add_config_args(
        p,
        "models",
        preset_note="init mode builds new models from architecture specs (tiny) or from "
        "a pretrained teacher with a student {from_teacher: true, ...} (minilm); a preset naming two "
        "pretrained models (paper) is refused: check such a pair with --teacher/--student",
    )


def _check_spec(name: str, spec) -> dict:
    if isinstance(spec, str):
        raise UserError(
            f"models.{name}: {spec!r} names a pretrained model; init-models builds new models from "
            "architecture specs (use --preset tiny), or check a pretrained pair with "
            "`kdcl-dist init-models --teacher NAME --student NAME`"
        )
    if not isinstance(spec, dict):
        raise UserError(
            f"models.{name}: expected a mapping with {', '.join(sorted(_SPEC_KEYS))}, got {spec!r}"
        )
    missing = sorted(_SPEC_KEYS - set(spec))
    if missing:
        raise UserError(
            f"models.{name}: missing {', '.join(missing)} (allowed keys: {', '.join(sorted(_SPEC_KEYS))})"
        )
    if spec["type"] not in ("bert", "distilbert"):
        raise UserError(f"models.{name}.type: {spec['type']!r} is not one of bert, distilbert")
    if spec["hidden_size"] % spec["num_heads"]:
        raise UserError(
            f"models.{name}: hidden_size {spec['hidden_size']} is not divisible by "
            f"num_heads {spec['num_heads']}"
        )
    return spec


def check_pair(teacher: str, student: str) -> str:
    """Refuse a teacher/student pair with different vocabularies; return a one-line summary."""
    from transformers import AutoConfig

    from kdcl_dist.data.tokenizer import check_mlm_tokenizer, load_tokenizer
    from kdcl_dist.kd.models import check_same_vocabulary

    tt, st = load_tokenizer(teacher), load_tokenizer(student)
    check_same_vocabulary(tt, st, teacher, student)
    check_mlm_tokenizer(tt, teacher)
    check_mlm_tokenizer(st, student)
    sizes = []
    from kdcl_dist.kd.models import resolve_model_ref

    for name in (teacher, student):
        try:
            sizes.append(AutoConfig.from_pretrained(resolve_model_ref(name)).vocab_size)
        except (OSError, ValueError) as e:
            raise UserError(
                f"{name}: cannot read the model config ({str(e).splitlines()[0]})"
            ) from None
    if sizes[0] != sizes[1]:
        raise UserError(
            f"teacher {teacher} and student {student} have output layers of different sizes "
            f"({sizes[0]} vs {sizes[1]}) although their tokenizers match; KD needs equal vocabularies"
        )
    return f"ok: {teacher} and {student} share one vocabulary ({len(tt)} tokens, model vocab_size {sizes[0]})"


def _fresh_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite or choose another --out")


def _write_atomic(dest: Path, build) -> None:
    """Run build(tmp_dir) in a temporary sibling directory, renamed to dest when complete."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    from kdcl_dist.utils import apply_umask_modes, make_temp_dir

    tmp = make_temp_dir(
        dest.parent, f".tmp-{dest.name}."
    )  # 0777 less the umask (mkdtemp's would be 0700)
    try:
        build(tmp)
        apply_umask_modes(tmp)  # safetensors writes its file 0600
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def build_student(teacher: str, layers: int, arch: str, out: Path) -> str:
    """--student-from-teacher: write the student to `out`; return a one-line summary."""
    from kdcl_dist.kd.models import student_from_teacher

    info = {}

    def build(tmp):
        info["s"], info["layers"], info["head"] = student_from_teacher(
            teacher, layers, arch, out_dir=tmp
        )

    _write_atomic(out, build)
    n = sum(p.numel() for p in info["s"].parameters())
    head = (
        "MLM head copied"
        if info["head"]
        else "no MLM head in the teacher: the student's head is new (train it)"
    )
    return (
        f"{out}: {type(info['s']).__name__} from {teacher}, teacher layers {info['layers']} copied, {head}, "
        f"{n / 1e6:.2f}M parameters"
    )


def _save_pretrained_copy(ref: str, out: Path) -> None:
    """<out>: the pretrained model `ref` as a local checkpoint (weights it lacks stay absent, so
    a missing head is still reported when it is loaded) with its tokenizer."""
    from kdcl_dist.data.tokenizer import load_tokenizer
    from kdcl_dist.kd.models import load_mlm

    def build(tmp):
        m = load_mlm(ref, role="teacher")
        fresh = set(getattr(m, "kdcl_fresh_weights", []))
        sd = {k: v for k, v in m.state_dict().items() if k not in fresh}
        m.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        load_tokenizer(ref).save_pretrained(tmp)

    _write_atomic(out, build)


def _from_teacher_spec(spec) -> dict | None:
    if isinstance(spec, dict) and spec.get("from_teacher"):
        extra = set(spec) - {"from_teacher", "layers", "arch"}
        if extra or not isinstance(spec.get("layers"), int):
            raise UserError(
                f"models.student: {spec!r}: a student from the teacher takes from_teacher: true, "
                "layers: N (int) and optionally arch: distilbert|teacher"
            )
        return spec
    return None


def run_pretrained(cfg, args) -> int:
    """Preset/config naming a pretrained teacher and a student {from_teacher: true, layers: N}:
    copy the teacher, build the student from it. (A pair of pretrained names is used as is:
    nothing to initialise; check it with --teacher/--student.)"""
    out = Path(args.out)
    for name in ("teacher", "student"):
        _fresh_dir(out / name, args.overwrite)
    spec = _from_teacher_spec(cfg.student)
    _save_pretrained_copy(cfg.teacher, out / "teacher")
    print(f"{out / 'teacher'}: {cfg.teacher} (pretrained) with its tokenizer")
    print(
        build_student(
            str(out / "teacher"), spec["layers"], spec.get("arch", "distilbert"), out / "student"
        )
    )
    print(check_pair(str(out / "teacher"), str(out / "student")))
    write_resolved(cfg, out, "models")
    return 0


def run(args) -> int:
    if not args.progress:
        quiet_libraries()
    if args.student_from_teacher:
        if not args.layers or not args.out:
            raise UserError("--student-from-teacher: pass --layers N and --out DIR")
        _fresh_dir(Path(args.out), args.overwrite)
        print(
            build_student(args.student_from_teacher, args.layers, args.student_arch, Path(args.out))
        )
        return 0
    if args.teacher or args.student:
        if not (args.teacher and args.student):
            raise UserError("--teacher and --student: check mode needs both")
        print(check_pair(args.teacher, args.student))
        return 0
    from kdcl_dist.utils import check_output_path, make_temp_dir

    if args.out:
        check_output_path(args.out, "dir")  # before loading anything
    cfg = resolve_args(args)
    if isinstance(cfg.teacher, str) and _from_teacher_spec(cfg.student) is not None:
        if not args.out:
            raise UserError(
                f"models.teacher: {cfg.teacher!r} is a pretrained model; pass --out DIR"
            )
        return run_pretrained(cfg, args)
    if not args.tokenizer or not args.out:
        raise UserError(
            "init-models: pass --tokenizer DIR --out DIR (or --teacher/--student to check a pair)"
        )
    from kdcl_dist.data.tokenizer import check_mlm_tokenizer, load_tokenizer
    from kdcl_dist.kd.models import init_model_dir

    specs = {
        "teacher": _check_spec("teacher", cfg.teacher),
        "student": _check_spec("student", cfg.student),
    }
    tok = load_tokenizer(args.tokenizer)
    check_mlm_tokenizer(tok, args.tokenizer)
    out = Path(args.out)
    for name in specs:
        if (out / name).exists() and not args.overwrite:
            raise UserError(
                f"{out / name}: already exists; pass --overwrite or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(specs.items()):
        tmp = make_temp_dir(out, f".tmp-{name}.")  # 0777 less the umask (mkdtemp's would be 0700)
        try:  # written under a temporary name, renamed when complete
            model = init_model_dir(
                spec, tok, tmp, seed=cfg.seed + i, max_positions=cfg.max_position_embeddings
            )
            if (out / name).exists():
                shutil.rmtree(out / name)
            tmp.rename(out / name)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        n = sum(p.numel() for p in model.parameters())
        print(
            f"{out / name}: {spec['type']} masked LM, {n / 1e6:.2f}M parameters, vocab {len(tok)}"
        )
    write_resolved(cfg, out, "models")
    return 0
