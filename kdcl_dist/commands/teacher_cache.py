"""Cache the teacher's sparse distribution at every training mask position, once for all arms.

  kdcl-dist teacher-cache --curriculum runs/cur --teacher runs/models/teacher --out runs/tcache
  torchrun --nproc-per-node 2 -m kdcl_dist teacher-cache --curriculum ... --teacher ... --out ...
  kdcl-dist train ... --teacher-cache runs/tcache      (the teacher is then not loaded)

Curriculum shards are spread over the ranks balanced by tokens; one directory per shard is
written atomically and a re-run skips the shards already cached with the same teacher,
curriculum, masks, τ and method. See kdcl_dist/kd/teacher_cache.py and docs/training.md.
"""

from __future__ import annotations

from pathlib import Path

from kdcl_dist.config import add_config_args, add_options, resolve_args, write_resolved


def add_arguments(p):
    p.add_argument("--curriculum", required=True, help="curriculum directory (curriculum.json)")
    p.add_argument("--teacher", required=True, help="teacher model directory or name")
    p.add_argument("--out", required=True, help="cache directory to write")
    from kdcl_dist.kd.teacher_cache import TeacherCacheConfig

    add_options(p, TeacherCacheConfig, "teacher_cache")
    add_config_args(p, "teacher_cache")


def run(args) -> int:
    from kdcl_dist import dist
    from kdcl_dist.curriculum.scoring import precheck_head
    from kdcl_dist.kd.teacher_cache import build_cache
    from kdcl_dist.utils import check_output_path

    check_output_path(args.out, "dir")
    cfg = resolve_args(args)
    precheck_head(args.teacher, cfg.allow_new_head, "teacher targets")
    with dist.stage() as info:
        if info.rank == 0:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            write_resolved(cfg, Path(args.out), "teacher_cache")
        man = build_cache(
            args.curriculum, args.teacher, args.out, cfg, rank=info.rank, world=info.world_size
        )
        if man is not None:
            t = man["totals"]
            print(
                f"teacher cache {args.out}: {t['samples']} samples x {man['identity']['draws']} draw(s), "
                f"{t['entries_per_position']:.1f} ids/position, {t['bytes_per_position']:.1f} bytes/position, "
                f"{t['bytes_per_1M_samples'] / 1e9:.2f} GB per 1M samples"
            )
    return 0
