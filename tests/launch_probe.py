"""A tiny distributed job for the launcher tests: `python -m launch_probe OUT_DIR`.

Run under any launcher (with tests/ on PYTHONPATH and KDCL_MODULE=launch_probe) it goes
through `kdcl_dist.dist.init()` exactly as the stages do, all-reduces a tensor, gathers
every rank's view of itself and writes `OUT_DIR/rank<R>.json`, so a test can check that
the launcher produced the expected world without paying for a real stage.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--local_rank")]
    out = Path(args[0])
    from kdcl_dist import dist

    info = dist.init(timeout_min=2.0)
    import torch

    t = torch.tensor([float(info.rank + 1)])
    dist.all_reduce_sum(t)
    me = {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "sum": float(t.item()),
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
        "hostname": socket.gethostname(),
        # Network namespace identity: tells which "host" of the netns test ran this rank.
        "netns": os.readlink("/proc/self/ns/net"),
        "env_probe": os.environ.get("KDCL_PROBE_ENV", ""),
        "cwd": os.getcwd(),
    }
    everyone = dist.all_gather_object(me)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{info.rank}.json").write_text(json.dumps({"me": me, "all": everyone}))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
