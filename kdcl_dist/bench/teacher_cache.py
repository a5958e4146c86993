"""Benchmark of the cached sparse teacher: KD step from the cache vs live KD vs student-only.

    kdcl-dist bench teacher-cache                       # tiny bench models on CPU (bench train's)
    kdcl-dist bench teacher-cache --cache runs/exp/tcache   # also that cache's bytes per 1M samples

Printed side by side, measured in one run (medians of interleaved repeats, as `bench train`):

1. step time of student-only, KD with the live teacher, KD from the cache (sampled sparse
   targets, K draws per masked position, prepared before the timed loop as the DataLoader
   workers prepare them in training), and the ratios to student-only (target for the cache:
   <= 1.10);
2. host time to gather one micro-batch's cached targets (CacheReader.targets + collate_targets,
   from the arrays of a cache shard written here): this runs in the DataLoader workers, off the
   training step;
3. cache size: entries (distinct ids) per position and bytes per position of these targets,
   bytes per 1M samples at the batch's masked positions per sample, and, with --cache, the
   figures of a real cache (its teacher_cache.json).

The bench models are random-init (near-uniform teachers), so their distinct ids per position
are close to K: an upper bound of the size; a trained teacher's distribution is peakier.
"""

from __future__ import annotations

import json
import statistics
import time


def add_arguments(p):
    from kdcl_dist.bench.train import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="bench train's sizes")
    p.add_argument("--samples", type=int, default=32, help="K: teacher draws per position")
    p.add_argument("--repeats", type=int, default=9, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature")
    p.add_argument(
        "--engine",
        action="store_true",
        help="also time the real KDEngine.step (DeepSpeed cpu_fp32): student-only, live KD, cached KD",
    )
    p.add_argument("--cache", default=None, help="a teacher-cache directory to report the size of")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("CACHED_EXP", "LIVE_EXP"),
        help="instead of timing: held-out MLM loss of --arm in two `kdcl-dist experiment` "
        "directories (same preparation, --teacher-cache auto vs off), per seed and the difference "
        "with its CI (evaluate/stats.py compare_seeds)",
    )
    p.add_argument("--arm", default="kd", help="the arm --compare reads (default kd)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")


def _cached_inputs(stepper, K: int, tau: float):
    """Sampled sparse targets of the stepper's batch, as the training collate delivers them."""
    import numpy as np
    import torch

    from kdcl_dist.kd.teacher_cache import sparse_targets

    with torch.inference_mode():
        t = stepper._masked(stepper.t_enc, stepper.t_head, stepper.ids, stepper.attn).float()
    M = t.shape[0]
    u = np.random.default_rng(0).random((M, K))
    n, ids, counts, ent = sparse_targets(t, tau, "sample", K, u)
    umax = int(n.max())
    col = torch.arange(len(ids)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    row = torch.repeat_interleave(torch.arange(M), n)
    I = torch.zeros(M, umax, dtype=torch.long).index_put_((row, col), ids)  # noqa: E741
    W = torch.zeros(M, umax).index_put_((row, col), counts.float() / K)
    return {"kd_ids": I, "kd_w": W, "kd_ent": ent.float()}, n, ids, counts, ent


def _step_cached(stepper, mb: dict, tau: float) -> None:
    from kdcl_dist.kd.teacher_cache import cached_step_terms

    s_logits = stepper._masked(stepper.s_enc, stepper.s_head, stepper.ids, stepper.attn).float()
    n = float(len(stepper.labels))
    res, _ = cached_step_terms(s_logits, mb, stepper.labels, 0.5, tau, n, stepper.device)
    res["loss"].backward()
    stepper.opt.step()
    stepper.opt.zero_grad(set_to_none=True)


def _host_gather_time(tmp, n, ids, counts, ent, per_sample: list[int], K: int, repeats: int):
    """Median seconds to read one micro-batch's targets back from cache arrays on disk."""
    from pathlib import Path

    import numpy as np

    from kdcl_dist.kd.teacher_cache import ARRAYS, CacheReader, collate_targets

    d = Path(tmp) / "shard.tcache"
    d.mkdir()
    row_pos = np.concatenate([[0], np.cumsum(per_sample)]).astype(np.int64)
    n_np = n.numpy()
    row_ent = np.concatenate(
        [[0], np.cumsum([n_np[a:b].sum() for a, b in zip(row_pos, row_pos[1:])])]
    )
    arrays = {
        "row_pos": row_pos,
        "row_ent": row_ent.astype(np.int64),
        "n_unique": n_np.astype(np.uint8),
        "entropy": ent.numpy().astype(np.float32),
        "ids": ids.numpy().astype(np.uint16),
        "weights": counts.numpy().astype(np.uint8),
    }
    for a in ARRAYS:
        np.save(d / f"{a}.npy", arrays[a])

    class _Locate:  # positions 0..B-1 all in shard 0
        def locate(self, p):
            return 0, int(p)

    man = {
        "identity": {"draws": 1, "method": "sample", "samples": K},
        "shards": [{"dir": d.name}],
    }
    reader = CacheReader(tmp, man, _Locate())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        items = []
        for p, m in enumerate(per_sample):
            ids_, w_, e_ = reader.targets(p, 0, m)
            items.append({"kd_ids": ids_, "kd_w": w_, "kd_ent": e_})
        collate_targets(items, {})
        times.append(time.perf_counter() - t0)
    return statistics.median(times), {a: arrays[a].nbytes for a in ARRAYS}


def compare(cached_dir, live_dir, arm: str) -> dict:
    """Held-out MLM of `arm` from the cached-teacher experiment minus the live-teacher one."""
    from pathlib import Path

    from kdcl_dist.errors import UserError
    from kdcl_dist.evaluate import stats
    from kdcl_dist.experiment import _load_arm_mlm

    arms = {}
    for name, d in (("cached", cached_dir), ("live", live_dir)):
        got = _load_arm_mlm(Path(d) / "evals", arm, 1000)
        if got is None:
            raise UserError(
                f"{d}/evals: no held-out evaluation of arm {arm}; run the experiment first"
            )
        arms[name] = got
    (a_num, a_den, a_loss), (b_num, b_den, b_loss) = arms["cached"], arms["live"]
    c = stats.compare_seeds(a_num, b_num, a_den, b_den)
    return {"arm": arm, "cached": a_loss, "live": b_loss, **c}


def time_engines(args, preset, batch, mb_cache: dict) -> dict:
    """KDEngine.step of the three variants, one engine each, interleaved repeats (medians)."""
    import copy

    from kdcl_dist.bench.train import build_models
    from kdcl_dist.kd import engine as kde
    from kdcl_dist.train import init_distributed

    init_distributed()
    B = preset["batch"]
    teacher0, student0 = build_models(preset)
    engines, batches = {}, {}
    for name in ("student", "kd", "kd_cache"):
        cfg = kde.prepare_student_config(
            "cpu_fp32", global_batch=B, micro_batch=B, world_size=1, lr=1e-4,
            warmup_steps=0, total_steps=10**6, on_gpu=False,
        )  # fmt: skip
        engines[name] = kde.KDEngine(
            copy.deepcopy(student0),
            copy.deepcopy(teacher0) if name == "kd" else None,
            cfg,
            world_size=1,
            options=kde.EngineOptions(temperature=args.temperature),
        )
        batches[name] = {**batch, **mb_cache} if name == "kd_cache" else batch
    times = {v: [] for v in engines}
    for i in range(args.warmup + args.repeats):
        for v, eng in engines.items():
            t0 = time.perf_counter()
            eng.step([batches[v]], lambda p: 0.5)
            if i >= args.warmup:
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def run(args) -> int:
    import os

    if args.compare:
        r = compare(*args.compare, args.arm)
        lo, hi = r["ci"]
        print(f"held-out MLM loss of arm {r['arm']} (per seed):")
        print(
            f"  cached teacher ({args.compare[0]}): " + ", ".join(f"{x:.4f}" for x in r["cached"])
        )
        print(f"  live teacher   ({args.compare[1]}): " + ", ".join(f"{x:.4f}" for x in r["live"]))
        print(
            f"  cached - live = {r['diff']:+.4f} (95% CI {lo:+.4f} .. {hi:+.4f}, p = {r['p']:.3f}, "
            f"df {r['df']:.1f}; detectable at 80% power: {r['mde']:.4f}); "
            + ("cached worse beyond the CI" if lo > 0 else "cached not worse beyond the CI")
        )
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(r, f, indent=2, default=float)
        return 0
    import tempfile

    import torch

    from kdcl_dist.bench.train import PRESETS, Stepper, _setup, _time_variants

    preset = dict(PRESETS[args.preset])
    args.device, args.dtype = "cpu", "fp32"
    device, dtype, _, teacher, student, batch = _setup(args, preset)
    st = Stepper(teacher, student, batch, device, dtype, args.temperature)
    st.init_optimizer_state()
    mb, n, ids, counts, ent = _cached_inputs(st, args.samples, args.temperature)

    class _Both:  # bench train's interleaved timer over the three variants
        def step(self, v):
            if v == "kd_cache":
                _step_cached(st, mb, args.temperature)
            else:
                st.step(v)

        def sync(self):
            st.sync()

    variants = ("student", "kd", "kd_cache")
    times = _time_variants(_Both(), variants, args.repeats, args.warmup)
    med = {v: statistics.median(times[v]) for v in variants}
    per_sample = (batch["labels"] != -100).sum(1).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        host_s, nbytes = _host_gather_time(
            tmp, n, ids, counts, ent, per_sample, args.samples, args.repeats
        )
    M = int(n.numel())
    bytes_pos = sum(nbytes.values()) / M
    pos_per_sample = M / len(per_sample)
    res = {
        "preset": args.preset,
        "batch": preset["batch"],
        "seq_len": preset["seq_len"],
        "threads": torch.get_num_threads(),
        "samples_K": args.samples,
        "step_s": med,
        "kd_over_student": med["kd"] / med["student"],
        "kd_cache_over_student": med["kd_cache"] / med["student"],
        "kd_cache_over_kd": med["kd_cache"] / med["kd"],
        "host_gather_s_per_micro_batch": host_s,
        "entries_per_position": float(n.float().mean()),
        "bytes_per_position": bytes_pos,
        "masked_positions_per_sample": pos_per_sample,
        "bytes_per_1M_samples_per_draw": bytes_pos * pos_per_sample * 1e6,
        "load": os.getloadavg(),
    }
    print(
        f"bench teacher-cache ({args.preset}: batch {preset['batch']} x {preset['seq_len']} tokens, "
        f"CPU, {res['threads']} threads, K={args.samples}; medians of {args.repeats} interleaved steps; "
        f"load {res['load'][0]:.2f})"
    )
    print(f"  {'variant':<22}{'step ms':>10}{'÷ student':>12}")
    for v, label in (
        ("student", "student-only"),
        ("kd", "KD, live teacher"),
        ("kd_cache", "KD, cached teacher"),
    ):
        print(f"  {label:<22}{med[v] * 1e3:>10.1f}{med[v] / med['student']:>12.3f}")
    if args.engine:
        eng = time_engines(args, preset, batch, mb)
        res["engine_step_s"] = eng
        print(f"  KDEngine.step (DeepSpeed cpu_fp32), interleaved medians of {args.repeats}:")
        for v, label in (
            ("student", "student-only"),
            ("kd", "KD, live teacher"),
            ("kd_cache", "KD, cached teacher"),
        ):
            print(f"  {label:<22}{eng[v] * 1e3:>10.1f}{eng[v] / eng['student']:>12.3f}")
    print(
        f"  KD cached ÷ KD live: {res['kd_cache_over_kd']:.3f}; host gather of one micro-batch's "
        f"targets (DataLoader worker): {host_s * 1e3:.2f} ms"
    )
    print(
        f"  cache size (these near-uniform bench teachers: an upper bound): {res['entries_per_position']:.1f} "
        f"ids/position, {bytes_pos:.1f} bytes/position, {pos_per_sample:.1f} masked positions/sample -> "
        f"{res['bytes_per_1M_samples_per_draw'] / 1e9:.2f} GB per 1M samples per draw"
    )
    if args.cache:
        from kdcl_dist.utils import read_json

        man = read_json(os.path.join(args.cache, "teacher_cache.json"), "teacher cache manifest")
        t = man["totals"]
        res["cache"] = {"dir": args.cache, "identity": man["identity"], "totals": t}
        print(
            f"  cache {args.cache}: {t['samples']} samples x {man['identity']['draws']} draw(s), "
            f"{t['entries_per_position']:.1f} ids/position, {t['bytes_per_position']:.1f} bytes/position, "
            f"{t['bytes_per_1M_samples_per_draw'] / 1e9:.2f} GB per 1M samples per draw"
        )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    return 0
