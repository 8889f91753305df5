"""Sparse against dense on this CPU: Linear latency (CSR) and saved-file size, by sparsity.

For each Linear shape and rows per call, a random weight is magnitude-pruned to each
sparsity; the dense ``nn.Linear`` and :class:`spectrim.runtime.SparseLinear` (CSR,
``torch.sparse.mm``) are timed with ``torch.utils.benchmark`` (median of blocked
autorange) in the same run, and the safetensors file of the layer is written dense and
packed (bitmask + values, :func:`spectrim.io.save_compressed`).  The crossover is the
lowest sparsity at which CSR is faster.  2:4 semi-structured kernels
(``torch.sparse.to_sparse_semi_structured``) need a CUDA GPU and are measured only when
one is present (never in CI).

    .venv/bin/python benchmarks/sparse_latency.py

Writes ``benchmarks/results/sparse_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
import torch.utils.benchmark as tbench
from torch import nn

from spectrim.io import save_compressed
from spectrim.runtime import SparseLinear

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--min-run-time", "0.01", "--shapes", "64x128", "--rows", "1", "32", "--sparsities", "0.5", "0.95"]  # fmt: skip


SHAPES = [(384, 1536), (1536, 384), (1024, 1024), (4096, 4096)]  # (in, out)
ROWS = [1, 32, 512]
SPARSITIES = [0.5, 0.7, 0.9, 0.95, 0.99]


def median(fn: object, x: torch.Tensor, min_run_time: float) -> float:
    t = tbench.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return float(t.blocked_autorange(min_run_time=min_run_time).median)


def prune(lin: nn.Linear, sparsity: float) -> None:
    with torch.no_grad():
        w = lin.weight
        k = round(sparsity * w.numel())
        if k:
            thr = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= thr] = 0.0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--shapes", nargs="+", default=[f"{i}x{o}" for i, o in SHAPES],
                    help="IN x OUT of each Linear, e.g. 384x1536")  # fmt: skip
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS, help="rows per call")
    ap.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sparse_latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
        assert all(len(sh) == 2 for sh in shapes)
    except (ValueError, AssertionError):
        ap.error(f"--shapes {args.shapes}: expected IN x OUT, e.g. 384x1536")
    rows_out = []
    sizes = []
    with tempfile.TemporaryDirectory() as tmp:
        for fan_in, fan_out in shapes:
            for s in args.sparsities:
                lin = nn.Linear(fan_in, fan_out).eval()
                prune(lin, s)
                dense_dir = save_compressed(
                    nn.Sequential(lin), Path(tmp) / f"d{fan_in}{s}", pack=False
                )
                pack_dir = save_compressed(nn.Sequential(lin), Path(tmp) / f"p{fan_in}{s}")
                d_bytes = (dense_dir / "model.safetensors").stat().st_size
                p_bytes = (pack_dir / "model.safetensors").stat().st_size
                sizes.append(
                    {
                        "shape": [fan_out, fan_in],
                        "sparsity": s,
                        "dense_bytes": d_bytes,
                        "packed_bytes": p_bytes,
                        "ratio": p_bytes / d_bytes,
                    }
                )
                sp = SparseLinear.from_linear(lin)
                for n in args.rows:
                    x = torch.randn(n, fan_in)
                    with torch.no_grad():
                        dense_s = median(lin, x, args.min_run_time)
                        sparse_s = median(sp, x, args.min_run_time)
                    row = {
                        "shape": [fan_out, fan_in],
                        "rows": n,
                        "sparsity": s,
                        "dense_s": dense_s,
                        "csr_s": sparse_s,
                        "speedup": dense_s / sparse_s,
                    }
                    rows_out.append(row)
                    print(
                        f"W {fan_out}x{fan_in} rows {n:4d} sparsity {s:.2f}: dense "
                        f"{dense_s * 1e6:9.1f} us  CSR {sparse_s * 1e6:9.1f} us  "
                        f"speed-up {dense_s / sparse_s:5.2f}x   file {p_bytes / d_bytes:.3f} of dense",
                        flush=True,
                    )
    crossover = {}
    for fan_in, fan_out in shapes:
        for n in args.rows:
            faster = [
                r["sparsity"]
                for r in rows_out
                if r["shape"] == [fan_out, fan_in] and r["rows"] == n and r["speedup"] > 1.0
            ]
            crossover[f"{fan_out}x{fan_in}/rows{n}"] = min(faster) if faster else None
    semi = None
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        from torch.sparse import to_sparse_semi_structured

        semi = []
        for fan_in, fan_out in shapes:
            w = torch.randn(fan_out, fan_in, device="cuda", dtype=torch.float16)
            mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(
                fan_out, fan_in // 4
            )
            ws = to_sparse_semi_structured(w * mask)
            x = torch.randn(fan_in, 4096, device="cuda", dtype=torch.float16)
            d = tbench.Timer("w @ x", globals={"w": w * mask, "x": x}).blocked_autorange().median
            s2 = tbench.Timer("w @ x", globals={"w": ws, "x": x}).blocked_autorange().median
            semi.append(
                {"shape": [fan_out, fan_in], "dense_s": d, "semi_2_4_s": s2, "speedup": d / s2}
            )
    out = {
        "benchmark": "sparse-latency",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "runs": rows_out,
        "crossover_sparsity": crossover,
        "file_sizes": sizes,
        "semi_structured_2_4_gpu": semi,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("crossover (lowest sparsity where CSR wins):", json.dumps(crossover, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
