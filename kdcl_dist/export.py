"""Export a trained student from a DeepSpeed checkpoint (any ZeRO stage) to an HF model directory.

    <out>/model.safetensors, config.json      AutoModelForMaskedLM.from_pretrained(<out>) loads it
    <out>/tokenizer.json, tokenizer_config... the student's tokenizer
    <out>/export.json                         provenance: checkpoint, tag, step, zero stage, sha256

Weights: ZeRO-1/2/3 checkpoints are consolidated to fp32 with DeepSpeed's
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` (it merges every rank's partition of
the fp32 master weights); a ZeRO-0 checkpoint already holds the whole module in
`mp_rank_00_model_states.pt`. The weights are loaded into a model built from the student's
HF config that training saved in `<train out>/student_config/` (or from `--student`), and
saved with `save_pretrained` (safetensors). The teacher is never in a training checkpoint.

`checkpoint` may be the training output dir, its `checkpoints/` dir, or one `global_stepN` dir.
Without a tag the newest complete and intact checkpoint is used (`resolve_checkpoint`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from kdcl_dist import checkpoint as ckpt
from kdcl_dist.errors import UserError

log = logging.getLogger("kdcl_dist.export")

TAG_RE = ckpt.TAG_RE
MARKER = ckpt.MARKER  # written by kdcl_dist.checkpoint after every rank saved
CONFIG_SUBDIR = "student_config"


def resolve_checkpoint(path, tag: str | None = None) -> tuple[Path, str]:
    """(directory holding the tag dirs, tag) from a training out dir, checkpoints dir or tag dir.

    A checkpoint written by `kdcl-dist train` is exported only when it is complete (its
    kdcl_complete.json exists) and intact (every file has the size and sha256 recorded there).
    Without --tag the newest such one is taken: newer interrupted or damaged ones are skipped
    with a warning, and DeepSpeed's `latest` file is not trusted (it can name an interrupted
    save). An explicit --tag (or global_stepN directory) that is incomplete or damaged is an
    error. A plain DeepSpeed directory (no kdcl-dist markers at all) falls back to its `latest`.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p}: checkpoint path not found; pass the training --out, its checkpoints/ or a "
            "global_stepN directory"
        )
    if TAG_RE.match(p.name) and p.is_dir():
        if tag is not None and tag != p.name:
            raise UserError(
                f"{p}: is checkpoint {p.name} but --tag {tag} was given; pass one of them"
            )
        _check_tag(p.parent, p.name)
        return p.parent, p.name
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is not None:
        if not _plain_name(tag) or not (root / tag).is_dir():
            raise UserError(
                f"{root / tag}: no checkpoint with tag {tag}; available: {', '.join(_tags(root)) or 'none'}"
            )
        _check_tag(root, tag)
        return root, tag
    tags = _tags(root)
    complete = [t for t in tags if (root / t / MARKER).exists()]
    if complete:
        # warns about damaged ones; refuses when all are damaged
        found = ckpt.newest_intact(
            root, fix="restore the files (the warnings above name them) or export another run"
        )
        found_step = int(TAG_RE.match(found.name).group(1))
        newer = [
            d.name for step, d, ok in ckpt.list_checkpoints(root) if not ok and step > found_step
        ]
        if newer:
            log.warning(
                "skipping interrupted checkpoint(s) %s (no %s); exporting %s",
                ", ".join(newer),
                MARKER,
                found.name,
            )
        return root, found.name
    if tags and _kdcl_run(root):
        raise UserError(
            f"{root}: no complete checkpoint (no {MARKER} in {', '.join(tags)}: saves were "
            "interrupted); finish one with `kdcl-dist train ... --resume auto`"
        )
    if (
        root / "latest"
    ).is_file():  # a plain DeepSpeed checkpoint directory (not written by kdcl-dist train)
        t = (root / "latest").read_text(errors="replace").strip()
        if not _plain_name(t) or not (root / t).is_dir():
            raise UserError(
                f"{root / 'latest'}: names {t!r}, which is not a checkpoint directory inside {root}; "
                "pass --tag"
            )
        log.warning(
            "%s: no %s markers (not written by kdcl-dist train): exporting DeepSpeed's latest tag %s "
            "unverified",
            root,
            MARKER,
            t,
        )
        return root, t
    if tags:
        raise UserError(
            f"{root}: no complete checkpoint (no {MARKER} in {', '.join(tags)}); pass --tag"
        )
    raise UserError(
        f"{root}: no global_stepN checkpoint found; pass the training --out or a checkpoint dir"
    )


def _plain_name(tag: str) -> bool:
    """A tag is one directory name inside the checkpoint root (never a path that leaves it)."""
    return (
        bool(tag)
        and tag not in (".", "..")
        and "/" not in tag
        and "\\" not in tag
        and "\0" not in tag
    )


def _kdcl_run(root: Path) -> bool:
    """Written by `kdcl-dist train`: some tag has a marker, or the run's student_config is beside it."""
    return (
        any((root / t / MARKER).exists() for t in _tags(root))
        or (root.parent / CONFIG_SUBDIR).is_dir()
    )


def _check_tag(root: Path, tag: str) -> None:
    """Refuse an explicitly chosen checkpoint that is interrupted or damaged."""
    tag_dir = root / tag
    others = [t for t in _tags(root) if t != tag and (root / t / MARKER).exists()]
    hint = (
        f"export a complete one ({', '.join(others)}) or omit --tag for the newest intact one"
        if others
        else "finish a checkpoint with `kdcl-dist train ... --resume auto`"
    )
    if not (tag_dir / MARKER).exists():
        if _kdcl_run(root):
            raise UserError(
                f"{tag_dir}: incomplete checkpoint (no {MARKER}: its save was interrupted); {hint}"
            )
        log.warning(
            "%s: no %s (not written by kdcl-dist train): exporting it unverified", tag_dir, MARKER
        )
        return
    problem = ckpt.damage(tag_dir)
    if problem:
        raise UserError(f"{problem}; checkpoint {tag} is damaged: {hint}")


def _tags(root: Path) -> list[str]:
    return [d.name for _, d, _ in ckpt.list_checkpoints(root)]


def find_student_config(root: Path, student: str | None) -> str:
    """The student's HF config + tokenizer: <train out>/student_config, else --student."""
    if student:
        return student
    for cand in (root.parent / CONFIG_SUBDIR, root / CONFIG_SUBDIR):
        if (cand / "config.json").exists():
            return str(cand)
    raise UserError(
        f"{root.parent / CONFIG_SUBDIR}: student config not found (training saves it there); "
        "pass --student DIR|NAME with the student's config and tokenizer"
    )


def consolidated_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 state dict of the whole student from one checkpoint tag of any ZeRO stage."""
    tag_dir = root / tag
    if any(tag_dir.glob("*optim_states.pt")) or any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise UserError(
                f"{tag_dir}: cannot consolidate the ZeRO checkpoint ({e}); is every rank's file present?"
            ) from e
        return {k: v.float() for k, v in sd.items()}
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise UserError(
            f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt); not a checkpoint"
        )
    blob = torch.load(states[0], map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in blob["module"].items()}


def _tied_targets(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names = set(tied.keys()) if isinstance(tied, dict) else set(tied)
    # also any parameter that shares storage with another one (tied embeddings/decoder)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.add(name)
        else:
            seen[id(p)] = name
    return names


def build_student(config_src: str, state_dict: dict, trust_remote_code: bool = False):
    from transformers import AutoConfig, AutoModelForMaskedLM

    try:
        config = AutoConfig.from_pretrained(config_src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{config_src}: cannot read the student's HF config ({str(e).splitlines()[0]})"
        ) from e
    model = AutoModelForMaskedLM.from_config(config, trust_remote_code=trust_remote_code)
    model = model.float()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = _tied_targets(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(
            f"{config_src}: the checkpoint does not match the student config (missing {missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}); export with the config the student was trained with (--student)"
        )
    model.tie_weights()
    return model.eval()


def export_checkpoint(
    checkpoint, out, tag: str | None = None, student: str | None = None, force: bool = False
) -> Path:
    from kdcl_dist.utils import apply_umask_modes, read_json, sha256_file, write_json_atomic

    root, tag = resolve_checkpoint(checkpoint, tag)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "export.json").exists() and not force:
        raise UserError(
            f"{out}: directory exists and is not an earlier export; pass an empty or new --out "
            "(or --force to overwrite)"
        )
    config_src = find_student_config(root, student)
    log.info("consolidating %s/%s", root, tag)
    sd = consolidated_state_dict(root, tag)
    model = build_student(config_src, sd)

    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(config_src)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{config_src}: no tokenizer beside the student config ({str(e).splitlines()[0]}); "
            "pass --student with the student's model directory"
        ) from e

    # write into a sibling temp dir and swap it in, so a kill never leaves a half export
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = out.parent / f"{_TMP_PREFIX}{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        marker = {}
        if (root / tag / MARKER).exists():
            marker = read_json(root / tag / MARKER, "checkpoint marker")
        m = TAG_RE.match(tag)
        weights = tmp / "model.safetensors"
        write_json_atomic(
            tmp / "export.json",
            {
                "checkpoint": str((root / tag).resolve()),
                "tag": tag,
                "step": int(m.group(1)) if m else marker.get("step"),
                "zero_stage": marker.get("zero_stage"),
                "student_config": str(config_src),
                "dtype": "float32",
                "model_sha256": sha256_file(weights) if weights.exists() else None,
            },
        )
        apply_umask_modes(tmp)  # safetensors writes 0600 whatever the umask; give the umask's modes
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(
            tmp, ignore_errors=True
        )  # e.g. a full disk: give the space back, leave no half export
        raise
    return out


_TMP_PREFIX = ".tmp-export-"


def _remove_stale_temps(out: Path) -> None:
    """Delete temp dirs of earlier exports to the same --out whose process is gone (killed runs)."""
    for d in out.parent.glob(f"{_TMP_PREFIX}{out.name}-*"):
        pid = d.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True  # another user's live process
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def verify_export(
    out, checkpoint: str | None = None, seq_len: int = 32, tol: float = 1e-5
) -> float:
    """Reload `out` with AutoModelForMaskedLM and compare its logits with the checkpoint's weights.

    Rebuilds the model from the checkpoint recorded in export.json (consolidated again), runs
    both on the same random token ids, and raises if the largest difference exceeds `tol`.
    """
    from transformers import AutoModelForMaskedLM

    from kdcl_dist.kd.models import load_pretrained
    from kdcl_dist.utils import read_json

    out = Path(out)
    info = read_json(out / "export.json", "export record")
    ckpt = Path(checkpoint or info["checkpoint"])
    sd = consolidated_state_dict(ckpt.parent, ckpt.name)
    ref = build_student(str(out), sd)
    loaded = load_pretrained(AutoModelForMaskedLM, out).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, loaded.config.vocab_size, (2, seq_len), generator=g)
    with torch.no_grad():
        diff = float((loaded(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max())
    if diff > tol:
        raise UserError(
            f"{out}: exported model's logits differ from the checkpoint's by {diff:.3g} (> {tol}); "
            "the export is broken, please report it"
        )
    return diff
