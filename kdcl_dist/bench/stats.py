"""`kdcl-dist bench stats`: false-positive rate and power of the arm comparisons, by simulation.

Simulates the experiment's design (`kdcl_dist.evaluate.calibration`): held-out MLM loss with
631 documents and a between-seed std of 0.002 nats, and yes/no accuracy with 166 questions and
3 fine-tuning seeds per training seed. The MLM design is repeated for several shares of the
seed variance that are seed x document noise rather than a global shift of a seed's loss
(--shares): the old bootstrap's calibration depends on that share. For each seed count it
prints, per procedure, the share of null comparisons (two arms from the same distribution)
called significant at α = 0.05 with its Wilson 95% interval, and the power of the new
procedure at the docs' effect sizes.
The old bootstrap runs with fewer simulations (--old-sims) and n_boot = --n-boot (cost).
"""

from __future__ import annotations

import time


def add_arguments(p):
    p.add_argument(
        "--sims", type=int, default=4000, help="simulations per cell for the t-based procedures"
    )
    p.add_argument(
        "--old-sims",
        dest="old_sims",
        type=int,
        default=400,
        help="simulations per cell for the old compare_ratio bootstrap (slow; 0: skip it)",
    )
    p.add_argument(
        "--n-boot",
        dest="n_boot",
        type=int,
        default=1000,
        help="bootstrap replicates of the old procedure",
    )
    p.add_argument("--seeds", default="3,5", help="comma-separated training-seed counts per arm")
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation")
    p.add_argument(
        "--mlm-effects",
        dest="mlm_effects",
        default="0.003,0.026",
        help="true MLM-loss differences (nats) for the power columns",
    )
    p.add_argument(
        "--shares",
        default="0,0.1,0.5",
        help="MLM design: shares of the seed variance that are seed x document noise (rest: global shift)",
    )
    p.add_argument(
        "--yesno-effects",
        dest="yesno_effects",
        default="0.03,0.06",
        help="true accuracy differences (fractions) for the power columns",
    )


def _fmt(row: dict) -> str:
    f = row["fpr"]
    fpr = f"{100 * f['rate']:5.1f}% [{100 * f['ci'][0]:4.1f}, {100 * f['ci'][1]:4.1f}]"
    if row["power"]:
        scale, unit = (100, " pts") if row["unit"] == "points" else (1, "")
        power = "  ".join(f"{scale * e:g}{unit}: {r['rate']:.3f}" for e, r in row["power"].items())
        mde = f["mde_median"] * (100 if row["unit"] == "points" else 1)
        power += f"  (median MDE {mde:.4g}{unit})"
    else:
        power = "–"
    return f"{row['procedure']:<48} {row['design']:<44} {f['sims']:>6}  {fpr:<24} {power}"


def run(args) -> int:
    from kdcl_dist.evaluate.calibration import calibration_table

    seeds = [int(s) for s in args.seeds.split(",") if s]
    mlm_effects = [float(x) for x in args.mlm_effects.split(",") if x]
    yesno_effects = [float(x) for x in args.yesno_effects.split(",") if x]
    print(
        "α = 0.05; false-positive rate = share of null comparisons with p < 0.05 (95% Wilson CI); "
        f"old bootstrap: {args.old_sims} simulations, n_boot = {args.n_boot}; t procedures: {args.sims}."
    )
    print(
        f"{'procedure':<48} {'design':<44} {'sims':>6}  {'false-positive rate':<24} power at a true difference"
    )
    t0 = time.perf_counter()
    calibration_table(
        seeds=seeds,
        sims=args.sims,
        old_sims=args.old_sims,
        n_boot=args.n_boot,
        seed=args.seed,
        mlm_effects=mlm_effects,
        yesno_effects=yesno_effects,
        old=args.old_sims > 0,
        shares=[float(x) for x in args.shares.split(",") if x],
        progress=lambda row: print(_fmt(row), flush=True),
    )
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0
