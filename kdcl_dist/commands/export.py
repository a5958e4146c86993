"""Export the trained student as an HF masked-LM directory (safetensors + tokenizer + config).

  kdcl-dist export --checkpoint runs/train --out runs/student-hf
  kdcl-dist export --checkpoint runs/train/checkpoints --tag global_step500 --out runs/student-500

--checkpoint: the training --out, its checkpoints/ directory, or one global_stepN directory
(any ZeRO stage; ZeRO partitions are consolidated to fp32). The student's config and
tokenizer come from <train out>/student_config/, or from --student when that is absent.
Only a complete and intact checkpoint is exported (kdcl_complete.json present, every file
with the size and sha256 recorded there): without --tag the newest such one (newer
interrupted or damaged ones are skipped with a warning); an explicit --tag that is
interrupted or damaged is refused.
After writing, the directory is reloaded with AutoModelForMaskedLM and its logits are
compared with the consolidated weights' (skip with --no-verify).
"""

from __future__ import annotations

from kdcl_dist.progress import PROGRESS_HELP, add_progress_flag, quiet_libraries


def add_arguments(p):
    p.add_argument(
        "--checkpoint", required=True, help="training out dir, checkpoints/ dir or global_stepN dir"
    )
    p.add_argument("--out", required=True, help="HF model directory to write")
    p.add_argument(
        "--tag",
        help="checkpoint tag (global_stepN); default: newest complete and intact checkpoint",
    )
    p.add_argument(
        "--student",
        help="student model dir or name for config+tokenizer (default: <train out>/student_config)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite a non-empty --out that is not an earlier export",
    )
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the reload-and-compare check"
    )
    add_progress_flag(
        p, PROGRESS_HELP + "; also the loading bars of DeepSpeed's consolidation and HF libraries"
    )


def run(args) -> int:
    import json

    if not args.progress:
        quiet_libraries()

    from kdcl_dist.utils import check_output_path, setup_logging

    check_output_path(args.out, "dir", replace=True)  # before consolidating anything
    from kdcl_dist.export import export_checkpoint, verify_export

    setup_logging(0)
    out = export_checkpoint(
        args.checkpoint, args.out, tag=args.tag, student=args.student, force=args.force
    )
    info = json.loads((out / "export.json").read_text())
    msg = f"exported {info['tag']} (step {info['step']}) -> {out}"
    if args.verify:
        diff = verify_export(out)
        msg += f"; reload check: max |logit diff| = {diff:.2e}"
    print(msg)
    return 0
