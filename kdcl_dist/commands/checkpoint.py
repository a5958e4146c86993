"""Checkpoint tools.

kdcl-dist checkpoint list --out RUN_DIR
    the checkpoints of a run: step, complete / INCOMPLETE (interrupted save) / DAMAGED (a file
    no longer has the size or sha256 recorded at save time), world size, ZeRO stage, consumed samples
kdcl-dist checkpoint universal --checkpoint DIR [--tag global_stepN]
    convert a DeepSpeed checkpoint to a universal one (DIR/<tag>_universal) so that it can be
    resumed at another world size; `train --resume` does this automatically when needed
"""

from __future__ import annotations

import json
from pathlib import Path

from kdcl_dist.errors import UserError


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True, metavar="{list,universal}")
    p = sub.add_parser("list", help="list a run's checkpoints")
    p.add_argument(
        "--out", required=True, help="training output directory (or its checkpoints/ folder)"
    )
    p = sub.add_parser("universal", help="convert to a DeepSpeed universal checkpoint")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a global_stepN directory, a checkpoints/ folder, or a run directory",
    )
    p.add_argument(
        "--tag", default=None, help="global_stepN inside --checkpoint (default: latest complete)"
    )
    p.add_argument("--workers", type=int, default=1, help="extraction processes")


def _resolve(path: str, tag: str | None) -> Path:
    from kdcl_dist import checkpoint as ckpt

    p = Path(path)
    if tag:
        for base in (p, p / ckpt.SUBDIR):
            if ckpt.TAG_RE.match(tag) and (base / tag).is_dir():
                ckpt.check_intact(base / tag)
                return base / tag
        raise UserError(f"{path}: no checkpoint tag {tag}")
    found = (
        ckpt.find_resume(p.parent if p.name == ckpt.SUBDIR else p, str(p)) if p.exists() else None
    )
    if found is None:
        raise UserError(f"{path}: no complete checkpoint found")
    return found


def run(args) -> int:
    from kdcl_dist import checkpoint as ckpt

    if args.action == "list":
        root = Path(args.out)
        root = root if root.name == ckpt.SUBDIR else root / ckpt.SUBDIR
        items = ckpt.list_checkpoints(root)
        if not items:
            raise UserError(f"{root}: no checkpoints")
        for _step, d, ok in items:
            problem = ckpt.damage(d) if ok else None
            try:
                m = json.loads((d / ckpt.MARKER).read_text()) if ok and not problem else {}
            except (OSError, ValueError):
                m = {}
            state = "INCOMPLETE" if not ok else "DAMAGED" if problem else "complete"
            line = (
                f"{d.name:<22} {state:<10} world={m.get('world_size', '?')} "
                f"zero={m.get('zero_stage', '?')} consumed={m.get('consumed_samples', '?')}"
            )
            print(line + (f"  ({problem})" if problem else ""))
        return 0
    tag_dir = _resolve(args.checkpoint, args.tag)
    out = ckpt.convert_to_universal(tag_dir, workers=args.workers)
    print(f"universal checkpoint: {out}")
    return 0
