"""The block pass's fits with and without the lock-step, A/B in alternating fresh processes.

With ``block_cache`` the block-by-block pass fits each consumer by replaying one batch at
a time up to it (``sequential_correct(replay=True)``) instead of parking every batch at
it (the lock-step).  This runs the pretrained CIFAR-10 ResNet-56, ``id`` to ``macs=0.5``
with the default (residual) fit, all ``--calib`` images fitted in batches of 64, with
``block_cache``, ``--repeats`` times each way, alternating, each in a fresh process (peak
RSS is noisy from run to run), and checks that both give the same weights::

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/replay_ab.py \\
        --out benchmarks/results/replay_ab.json

Writes JSON: per run, the way, seconds, peak RSS and RSS before compressing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
SMOKE = ["--calib", "128", "--repeats", "1"]  # fmt: skip


def one(way: str, calib: int) -> dict[str, Any]:
    """One compression, the lock-step forced off or on (``way``)."""
    import spectrim
    import spectrim.calibration.sequential as seq
    from spectrim.zoo import load_dataset, load_pretrained

    if way == "lockstep":  # the code before replay: every batch parked at each consumer
        run = seq._run_lockstep

        def lockstep(*args: Any, **kwargs: Any) -> None:
            kwargs["replay"] = False
            run(*args[:7], **kwargs)

        seq._run_lockstep = lockstep  # type: ignore[assignment]
    model = load_pretrained("resnet56-cifar10").eval()
    x, _ = load_dataset("cifar10", "calib", limit=calib).tensors
    batches = list(x.split(64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        small, report = spectrim.compress(
            model, batches, "id", "macs=0.5", sequential_fraction=1.0, block_cache=cache
        )
        seconds = time.perf_counter() - t
    state = {k: v.double() for k, v in small.state_dict().items() if v.is_floating_point()}
    return {
        "way": way,
        "calibration": calib,
        "blocks": report.blocks,
        "compress_s": seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_before_compress_bytes": before,
        "weights_sum": float(sum(v.sum() for v in state.values())),
        "weights_abs_sum": float(sum(v.abs().sum() for v in state.values())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "replay_ab.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, args.calib)))
        return
    runs = []
    for _ in range(args.repeats):
        for way in ("lockstep", "replay"):
            cmd = [sys.executable, __file__, "--one", way, "--calib", str(args.calib),
                   "--threads", str(args.threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            runs.append(row)
            print(
                f"{way}: {row['compress_s']:.1f} s, peak RSS "
                f"{row['peak_rss_bytes'] / 2**30:.2f} GiB (before compressing "
                f"{row['peak_rss_before_compress_bytes'] / 2**30:.2f})",
                flush=True,
            )
    same = len({(r["weights_sum"], r["weights_abs_sum"]) for r in runs}) == 1
    print("same weights in every run:", same)
    out = {"command": " ".join(sys.argv), "runs": runs, "same_weights": same}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print("wrote", path)
    if not same:
        raise SystemExit("the lock-step and the replay gave different weights")


if __name__ == "__main__":
    main()
