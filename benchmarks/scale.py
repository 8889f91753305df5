"""Scale: time and peak memory of calibration and compression against the calibration size
n and the layer width m, one process against two, the CPU against a GPU, and where the
factorisations run fastest.

Parts (``--parts``, default all that the machine can run):

* ``wide``: a synthetic wide MLP ``256 → m → m → 10`` (inputs with a decaying spectrum),
  ``id`` to ``macs=0.5`` with its sequential correction, for every m in ``--widths`` and n
  in ``--rows``; each configuration in a fresh process, so its peak resident memory
  (``ru_maxrss``) is its own.  Reports the seconds of the statistics pass, the selection,
  the apply stage and the whole run, against one plain forward pass over the same rows.
* ``procs``: the pretrained CIFAR-10 ResNet-56 (1000 lossless images) compressed by one
  process and by two gloo processes (``torch.distributed``, one thread each, the batches
  split between them): wall time of each and whether the two results are equal.
* ``device``: the same ResNet-56 run and the widest MLP on the CPU and with
  ``device="cuda"`` (only where CUDA is available), in the same run: seconds, peak GPU
  memory, and the agreement of the two compressed models' predictions.
* ``sketch``: the randomized path for wide layers (``stats_memory``): the same wide MLP
  compressed with exact Grams and with budgets of a half, a quarter and an eighth of them
  (each 1024+-wide group then selected from a sketch of ``m/2``, ``m/4``, ``m/8`` rows),
  each in a fresh process (seconds, peak RSS, output error, widths); and, on the
  activations of the MLP's first wide layer, the units a sketch of ``k`` rows picks
  (``SketchIDSolver``'s order) against the exact ID's: their overlap and the exact
  least-squares error of reconstructing the layer from each set.
* ``blocks``: the sequential corrections block by block (``blockwise=True``) against the
  whole-model pass, each in a fresh process, for the models of ``--blocks-models``: the
  pretrained CIFAR-10 ResNet-56 (``resnet56``: ``id``, ``macs=0.5``, ``--calib`` images),
  the real all-MiniLM-L6-v2 (``minilm``: ``id``, half of every FFN, ``--minilm-calib``
  seeded sts-train sentences) and a torchvision ResNet-50 with random weights
  (``resnet50``: ``id``, ``macs=0.5``, ``--images`` random 224² images in batches of
  32), all fitted on every calibration example, with the consumer fit ``--blocks-fit``
  (``inputs``, the interpolation; ``auto``, the default, which runs the residual output
  fit on the ResNets): seconds, peak RSS, and the largest difference between the
  results' outputs.  ``--blocks-passes`` picks the passes: ``whole`` (the whole-model
  pass), ``blocks`` (block by block, boundaries in memory), ``disk`` (block by block,
  boundaries in files, ``block_cache``), and ``stats`` / ``stats-disk`` (the same two with
  the statistics measured block by block too, ``block_statistics``).
* ``offload``: a model held on disk by accelerate (``from_pretrained(device_map={"": "disk"},
  offload_folder=...)``) against the same model in memory, compressed block by block
  (``id``, half of every FFN): a random-weight BERT-base (110M parameters, 440 MB in
  float32; the weights do not matter for memory), 64 sequences of 64 tokens; in memory
  with a copy (the default), in memory in place, and from disk (``--offload-modes``; with
  ``+stats`` the statistics block by block, ``block_statistics``, and ``+cache`` the
  boundaries in files, ``block_cache``); each in a fresh process: seconds, peak RSS
  against the model's bytes, and whether the results are identical.
* ``greedy``: ``spectral``'s θ-mixed greedy (``linalg.spectral_greedy``, every step, the
  error curve) on an m × m Gram for m in ``--factor-widths``, θ = 0.5 (an output-aware
  weighting of 384 random rows, as a consumer's) and θ = 1, against the form it replaced
  in stop 44 (two m × m matrix-vector products per step, kept here as the reference),
  timed in turn in one process, ``--greedy-repeats`` times each: the fastest seconds of
  each, their ratio, whether the orders are the same and the largest difference of the
  losses (relative to the first).
* ``factor``: the factorisations of an m × m Gram: SciPy's pivoted QR (``id``) and
  ``eigh`` (``spectral``) on the host with one BLAS thread and with all, and
  ``torch.linalg.eigh`` on the GPU (with the transfer), for m in ``--factor-widths``.

    .venv/bin/python benchmarks/scale.py                       # CPU parts, this machine
    .venv/bin/python benchmarks/scale.py --parts device factor  # on a machine with a GPU

Writes ``benchmarks/results/scale.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# the few-second run of the test suite (tests/benchmarks/test_smoke.py; spectrim bench --smoke)
SMOKE = ["--parts", "wide", "sketch", "factor", "greedy", "blocks", "--blocks-models", "resnet56", "--blocks-passes", "blocks", "disk", "--widths", "128", "--rows", "512", "--factor-widths", "128", "--sketch-widths", "128", "--sketch-rows", "512", "--calib", "64", "--greedy-repeats", "1"]  # fmt: skip


HERE = Path(__file__).resolve().parent
PARTS = ("wide", "procs", "device", "sketch", "blocks", "offload", "factor", "greedy")


def _wide_model(m: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(256, m), nn.ReLU(), nn.Linear(m, m), nn.ReLU(), nn.Linear(m, 10)
    ).eval()


def _wide_inputs(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, 256)  # a decaying spectrum: something to compress
    return torch.randn(n, 256, generator=g) * scale


def _forward_seconds(model: nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        model(batches[0])
        if batches[0].is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches:
            model(b)
        if batches[0].is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - t


def wide_one(m: int, n: int, device: str = "cpu") -> dict[str, Any]:
    """One wide-MLP configuration in this process."""
    from _results import compress

    model = _wide_model(m)
    batches = list(_wide_inputs(n).split(256))
    dev_batches = [b.to(device) for b in batches]
    fwd = _forward_seconds(model.to(device), dev_batches)
    model = model.cpu()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    small, report = compress(model, batches, "id", "macs=0.5", device=device)
    total = time.perf_counter() - t
    out: dict[str, Any] = {
        "m": m,
        "n": n,
        "device": device,
        "forward_pass_s": fwd,
        "compress_s": total,
        "times_forward": total / fwd,
        "timings": {k: round(v, 4) for k, v in report.timings.items()},
        "macs_ratio": report.macs_ratio,
        "gram_bytes_per_consumer": 8 * m * m,
    }
    if device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        x = _wide_inputs(1024, seed=7)
        ref, got = model(x), small(x)
    out["output_rel_error"] = float((got - ref).norm() / ref.norm())
    return out


def part_wide(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for m in args.widths:
        for n in args.rows:
            cmd = [
                sys.executable,
                __file__,
                "--wide-one",
                str(m),
                str(n),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                rows.append({"m": m, "n": n, "error": res.stderr[-2000:]})
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"wide m={m:5d} n={n:6d}: compress {row['compress_s']:.2f} s "
                f"({row['times_forward']:.1f}x a forward pass; statistics "
                f"{row['timings'].get('statistics', 0):.2f} s, selection "
                f"{row['timings'].get('selection', 0):.2f} s, apply "
                f"{row['timings'].get('apply', 0):.2f} s), peak RSS "
                f"{row['peak_rss_bytes'] / 2**20:.0f} MiB, output error {row['output_rel_error']:.3f}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ sketches of wide layers


def sketch_one(m: int, n: int, share: float) -> dict[str, Any]:
    """The wide MLP with ``stats_memory`` = ``share`` of its exact Grams (1: exact)."""
    from _results import compress

    model = _wide_model(m)
    batches = list(_wide_inputs(n).split(256))
    exact_bytes = 2 * 8 * m * m  # two wide groups, one consumer each (the output is pinned)
    budget = int(share * exact_bytes) if share < 1 else 1 << 40
    t = time.perf_counter()
    small, report = compress(model, batches, "id", "macs=0.5", stats_memory=budget)
    total = time.perf_counter() - t
    with torch.no_grad():
        x = _wide_inputs(1024, seed=7)
        ref, got = model(x), small(x)
    wide = [g for g in report.groups if g.width_before == m]
    return {
        "m": m,
        "n": n,
        "stats_memory": budget,
        "share_of_exact": share,
        "sketch_rows": [g.sketch_rows for g in wide],
        "widths": [g.width_after for g in wide],
        "compress_s": total,
        "timings": {k: round(v, 4) for k, v in report.timings.items()},
        "macs_ratio": report.macs_ratio,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "output_rel_error": float((got - ref).norm() / ref.norm()),
    }


def sketch_selection(m: int, n: int, seeds: int = 3) -> list[dict[str, Any]]:
    """The units a sketch of k rows picks against the exact ID's, on the first wide
    layer's activations: overlap, and the exact least-squares error of each set."""
    from spectrim.calibration.sketch import RowSketch
    from spectrim.graph.channels import UnitGroup
    from spectrim.linalg import fit_reconstruction, id_factorize, residual_of
    from spectrim.methods.interpolative import SketchIDSolver

    model = _wide_model(m)
    with torch.no_grad():
        z = model[1](model[0](_wide_inputs(n))).double()
    G = (z.T @ z).numpy()
    t = time.perf_counter()
    exact = id_factorize(G)
    exact_s = time.perf_counter() - t
    trace = float(np.trace(G))

    def err(S: np.ndarray) -> float:
        return float(np.sqrt(residual_of(G, S, fit_reconstruction(G, S)) / trace))

    rows = []
    for rows_share in (0.5, 0.25, 0.125):
        k = int(m * rows_share)
        for keep_share in (0.0625, 0.125, 0.25, 0.5, 0.75):
            j = int(m * keep_share)
            S0 = np.sort(exact.selected(j))
            e0 = err(S0)
            overlaps, ratios, secs = [], [], []
            for seed in range(seeds):
                sk = RowSketch(m, k, seed=seed)
                for i, b in enumerate(z.float().split(256)):
                    sk.begin(i)
                    sk.update(b)
                t = time.perf_counter()
                group = UnitGroup(0, "layer", np.arange(m), ["0"], [], [])
                solver = SketchIDSolver(group, {"1": sk.sketch_numpy()}, 0.0, sk.energies_numpy())
                secs.append(time.perf_counter() - t)
                S = np.sort(solver.order[:j])
                overlaps.append(len(np.intersect1d(S, S0)) / j)
                ratios.append(err(S) / e0 if e0 > 0 else 1.0)
            rows.append({
                "m": m, "n": n, "sketch_rows": k, "kept": j, "exact_error": e0,
                "sketch_error_ratio_mean": float(np.mean(ratios)),
                "sketch_error_ratio_max": float(np.max(ratios)),
                "overlap_mean": float(np.mean(overlaps)),
                "factor_s_exact": exact_s, "factor_s_sketch": float(np.mean(secs)),
            })  # fmt: skip
            r = rows[-1]
            print(
                f"selection m={m} k={k:5d} kept={j:5d}: exact error {e0:.4f}, sketch "
                f"x{r['sketch_error_ratio_mean']:.3f} (worst x{r['sketch_error_ratio_max']:.3f}), "
                f"overlap {r['overlap_mean']:.2f}, factor {exact_s:.2f} s vs "
                f"{r['factor_s_sketch']:.2f} s",
                flush=True,
            )
    return rows


def part_sketch(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for m in args.sketch_widths:
        for share in (1.0, 0.5, 0.25, 0.125):
            cmd = [sys.executable, __file__, "--sketch-one", str(m), str(args.sketch_rows),
                   str(share), "--threads", str(args.threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                runs.append({"m": m, "share_of_exact": share, "error": res.stderr[-2000:]})
                print(runs[-1], flush=True)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            runs.append(row)
            print(
                f"sketch m={m:5d} stats_memory={share:5.3f} of exact (rows {row['sketch_rows']}): "
                f"compress {row['compress_s']:.1f} s (statistics "
                f"{row['timings'].get('statistics', 0):.2f} s, selection "
                f"{row['timings'].get('selection', 0):.2f} s, apply "
                f"{row['timings'].get('apply', 0):.2f} s), peak RSS "
                f"{row['peak_rss_bytes'] / 2**20:.0f} MiB, widths {row['widths']}, "
                f"output error {row['output_rel_error']:.4f}",
                flush=True,
            )
    selection = [r for m in args.sketch_widths for r in sketch_selection(m, args.sketch_rows)]
    return {"runs": runs, "selection": selection}


# ------------------------------------------------------------------ block by block


def _minilm(
    calib: int,
) -> tuple[nn.Module, list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The real all-MiniLM-L6-v2, ``calib`` seeded sts-train sentences in padded batches
    of 32, and 4 batches of sts-test sentences to compare outputs on."""
    sys.path.insert(0, str(HERE))
    from sparsify_minilm import load_minilm, pick_sentences, read_sts
    from spectrim.calibration.text import text_batches

    root = Path(os.environ.get("SPECTRIM_DATA", HERE.parents[1] / "shared" / "data"))
    model, tok, pool = load_minilm(root)
    sents = pick_sentences(pool, calib, "random")
    batches = text_batches(sents, tok)
    pairs, _ = read_sts(root / "stsbenchmark" / "sts-test.csv")
    test = [a for a, _ in pairs[:128]]
    held = text_batches(test, tok)
    return model, batches, held


BLOCK_MODELS = ("resnet56", "minilm", "resnet50")
#: ``stats``: block_statistics with the boundaries in memory; ``stats-disk``: in files
BLOCK_PASSES = ("whole", "blocks", "disk", "stats", "stats-disk")


def blocks_one(which: str, mode: str, calib: int, out: str, fit: str) -> dict[str, Any]:
    """One model compressed with the whole-model or the block-by-block sequential pass
    (``mode``, one of :data:`BLOCK_PASSES`); its outputs on held-out inputs saved to
    ``out``."""
    import spectrim

    blockwise = mode != "whole"

    if which == "resnet56":
        from spectrim.zoo import load_dataset, load_pretrained

        model = load_pretrained("resnet56-cifar10").eval()
        batches: Any = _resnet_batches(calib)
        held: list[Any] = list(load_dataset("cifar10", "test", limit=256).tensors[0].split(64))
        target = "macs=0.5"
    elif which == "resnet50":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet50(weights=None).eval()
        g = torch.Generator().manual_seed(0)
        batches = list(torch.randn(calib, 3, 224, 224, generator=g).split(32))
        held = [torch.randn(16, 3, 224, 224, generator=g)]
        target = "macs=0.5"
    else:
        model, batches, held = _minilm(calib)
        target = "width=0.5"
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as cache:
        t = time.perf_counter()
        small, report = spectrim.compress(
            model,
            batches,
            "id",
            target,
            sequential_fraction=1.0,
            blockwise=blockwise,
            sequential_fit=fit,
            # only when asked: the memory passes also run on code before block_cache
            **({"block_cache": cache} if mode in ("disk", "stats-disk") else {}),
            **({"block_statistics": True} if mode.startswith("stats") else {}),
        )
        total = time.perf_counter() - t
        left = list(Path(cache).iterdir())
    if left:
        raise RuntimeError(f"block_cache left files behind: {left}")
    with torch.no_grad():
        outs = [
            small(b) if isinstance(b, torch.Tensor) else small(**b).last_hidden_state for b in held
        ]
    torch.save(outs, out)
    return {
        "model": which,
        "blockwise": blockwise,
        "pass": mode,
        "asked_fit": fit,
        "fit": report.sequential_fit,
        "blocks": report.blocks,
        "calibration": calib,
        "fitted_examples": report.fitted_examples,
        "compress_s": total,
        "timings": {k: round(v, 4) for k, v in report.timings.items()},
        "macs_ratio": report.macs_ratio,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_before_compress_bytes": rss_model,
        "warnings": [w for w in report.warnings if "blockwise" in w],
    }


def part_blocks(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {"resnet56": args.calib, "minilm": args.minilm_calib, "resnet50": args.images}
        for which in args.blocks_models:
            calib = sizes[which]
            outs = {}
            for mode in args.blocks_passes:
                path = str(Path(tmp) / f"{which}-{mode}.pt")
                cmd = [sys.executable, __file__, "--blocks-one", which, mode,
                       str(calib), path, args.blocks_fit,
                       "--threads", str(args.threads)]  # fmt: skip
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    rows.append({"model": which, "pass": mode, "error": res.stderr[-2000:]})
                    print(rows[-1], flush=True)
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                outs[mode] = torch.load(path)
                rows.append(row)
                print(
                    f"{which} {mode} ({row['fit']} fit, {row['blocks']} blocks): compress "
                    f"{row['compress_s']:.1f} s (apply {row['timings'].get('apply', 0):.2f} s), "
                    f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB (before compress "
                    f"{row['peak_rss_before_compress_bytes'] / 2**20:.0f}), fitted on "
                    f"{row['fitted_examples']} {row['warnings']}",
                    flush=True,
                )
            base = next(iter(outs), None)  # every pass against the first that ran
            for mode in [m for m in outs if m != base]:
                diff = max(
                    float((a - b).abs().max() / a.abs().max())
                    for a, b in zip(outs[base], outs[mode])
                )
                row = next(r for r in rows if r.get("model") == which and r.get("pass") == mode)
                row["max_rel_output_difference"] = diff
                row["compared_with"] = base
                print(
                    f"{which}: {mode}'s outputs differ from {base}'s by at most {diff:.2e} "
                    "of their largest value",
                    flush=True,
                )
    return rows


# ------------------------------------------------------------------ offloaded models

#: where the model is (``memory``: a copy made by compress; ``memory-inplace``; ``disk``:
#: accelerate), then ``+stats`` (``block_statistics=True``) and ``+cache`` (``block_cache``)
OFFLOAD_MODES = (
    "memory", "memory-inplace", "disk", "memory-inplace+stats", "disk+stats", "disk+stats+cache",
)  # fmt: skip


def _offload_model(folder: Path) -> None:
    """A random-weight BERT-base saved to ``folder`` (safetensors), once."""
    from transformers import BertConfig, BertModel

    if (folder / "config.json").exists():
        return
    torch.manual_seed(0)
    BertModel(BertConfig()).eval().save_pretrained(folder)


def offload_one(mode: str, folder: str, out: str) -> dict[str, Any]:
    """The BERT of ``folder`` loaded in memory or held on disk (``mode``), compressed
    block by block; its output on one batch saved to ``out``."""
    from transformers import BertModel

    from _results import compress

    where: dict[str, Any] = {}
    place, *extras = mode.split("+")
    if place == "disk":
        where = {"device_map": {"": "disk"}, "offload_folder": str(Path(folder) / "off")}
    t = time.perf_counter()
    model = BertModel.from_pretrained(folder, **where).eval()
    load_s = time.perf_counter() - t
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(1000, 20000, (16, 64), generator=g)} for _ in range(4)]
    # only when asked: the plain modes also run on code before these options
    options: dict[str, Any] = {"block_statistics": True} if "stats" in extras else {}
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(out).parent) as cache:
        if "cache" in extras:
            options["block_cache"] = cache
        small, report = compress(
            model, batches, "id", "width=0.5", blockwise=True,
            inplace=place == "memory-inplace", **options,
        )  # fmt: skip
    total = time.perf_counter() - t
    with torch.no_grad():
        torch.save(small(**batches[0]).last_hidden_state, out)
    return {
        "mode": mode,
        "load_s": load_s,
        "compress_s": total,
        "blocks": report.blocks,
        "timings": {k: round(v, 4) for k, v in report.timings.items()},
        "params_ratio": report.params_ratio,
        "model_bytes": report.params_before * 4,  # float32
        "peak_rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def part_offload(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bert"
        _offload_model(folder)
        outs = {}
        for mode in args.offload_modes:
            path = str(Path(tmp) / f"{mode}.pt")
            cmd = [sys.executable, __file__, "--offload-one", mode, str(folder), path,
                   "--threads", str(args.threads)]  # fmt: skip
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                rows.append({"mode": mode, "error": res.stderr[-2000:]})
                print(rows[-1], flush=True)
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            outs[mode] = torch.load(path)
            base = next(iter(outs))  # every mode against the first that ran
            if mode != base:
                row["max_abs_output_difference"] = float((outs[mode] - outs[base]).abs().max())
                row["compared_with"] = base
            rows.append(row)
            print(
                f"BERT-base {mode}: compress {row['compress_s']:.1f} s, peak RSS "
                f"{row['peak_rss_bytes'] / 2**20:.0f} MiB (model "
                f"{row['model_bytes'] / 2**20:.0f} MiB; after loading "
                f"{row['peak_rss_after_load_bytes'] / 2**20:.0f} MiB), output difference "
                f"{row.get('max_abs_output_difference', 0.0):.1e}",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------ ResNet-56, 1 vs 2 procs


def _resnet_batches(limit: int) -> list[torch.Tensor]:
    from spectrim.zoo import load_dataset

    x, _ = load_dataset("cifar10", "calib", limit=limit).tensors
    return list(x.split(64))


def procs_worker(rank: int, world: int, init: str, out: str, calib: int) -> None:
    import torch.distributed as dist

    from _results import compress
    from spectrim.zoo import load_pretrained

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model = load_pretrained("resnet56-cifar10").eval()
    batches = _resnet_batches(calib)
    t = time.perf_counter()
    small, report = compress(model, batches, "id", "macs=0.5")
    wall = time.perf_counter() - t
    if rank == 0:
        torch.save(
            {"state": small.state_dict(), "wall_s": wall, "timings": report.timings},
            Path(out) / f"world{world}.pt",
        )
    if world > 1:
        dist.destroy_process_group()


def part_procs(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result: dict[str, Any] = {"model": "resnet56-cifar10", "calibration": args.calib}
    for world in (1, 2):
        init = tmp / f"init{world}"
        cmd = [sys.executable, __file__, "--procs-worker"]
        t = time.perf_counter()
        procs = [
            subprocess.Popen(
                [*cmd, str(r), str(world), str(init), str(tmp), str(args.calib)], env=env
            )
            for r in range(world)
        ]
        for p in procs:
            p.wait(timeout=900)
        launch = time.perf_counter() - t
        got = torch.load(tmp / f"world{world}.pt", weights_only=False)
        result[f"world{world}"] = {
            "compress_s": got["wall_s"],
            "launch_s": launch,
            "timings": {k: round(v, 3) for k, v in got["timings"].items()},
        }
    a = torch.load(tmp / "world1.pt", weights_only=False)["state"]
    b = torch.load(tmp / "world2.pt", weights_only=False)["state"]
    result["max_abs_difference"] = max(
        float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()
    )
    result["speedup"] = result["world1"]["compress_s"] / result["world2"]["compress_s"]
    print(
        f"procs: ResNet-56 id macs=0.5 on {args.calib} images, 1 thread per process: "
        f"1 process {result['world1']['compress_s']:.2f} s, 2 processes "
        f"{result['world2']['compress_s']:.2f} s ({result['speedup']:.2f}x), results differ by "
        f"{result['max_abs_difference']:.1e}",
        flush=True,
    )
    return result


# ------------------------------------------------------------------ CPU against GPU


def part_device(args: argparse.Namespace) -> dict[str, Any]:
    from _results import compress
    from spectrim.zoo import load_dataset, load_pretrained

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name()}
    model = load_pretrained("resnet56-cifar10").eval()
    batches = _resnet_batches(args.calib)
    test, _ = load_dataset("cifar10", "test", limit=1000).tensors
    rows = {}
    preds = {}
    for dev in ("cpu", "cuda"):
        for method in ("id", "spectral"):
            compress(model, batches[:2], method, "macs=0.5", device=dev)  # warm-up
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            small, report = compress(model, batches, method, "macs=0.5", device=dev)
            wall = time.perf_counter() - t
            with torch.no_grad():
                preds[(dev, method)] = small(test).argmax(1)
            rows[f"resnet56/{method}/{dev}"] = {
                "compress_s": wall,
                "timings": {k: round(v, 3) for k, v in report.timings.items()},
                "macs_ratio": report.macs_ratio,
                **({"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if dev == "cuda" else {}),
            }
    for method in ("id", "spectral"):
        agree = float((preds[("cpu", method)] == preds[("cuda", method)]).float().mean())
        rows[f"resnet56/{method}/agreement_cpu_gpu"] = agree
        cpu_s, gpu_s = (
            rows[f"resnet56/{method}/cpu"]["compress_s"],
            rows[f"resnet56/{method}/cuda"]["compress_s"],
        )
        print(f"device: ResNet-56 {method}: cpu {cpu_s:.2f} s, cuda {gpu_s:.2f} s "
              f"({cpu_s / gpu_s:.2f}x), prediction agreement {agree:.3f}", flush=True)  # fmt: skip
    m = max(args.widths)
    for dev in ("cpu", "cuda"):
        rows[f"wide{m}/{dev}"] = wide_one(m, max(args.rows), dev)
        r = rows[f"wide{m}/{dev}"]
        print(f"device: wide MLP m={m}, n={max(args.rows)} on {dev}: {r['compress_s']:.2f} s "
              f"{r['timings']}", flush=True)  # fmt: skip
    out["runs"] = rows
    return out


# ------------------------------------------------------------------ factorisations


def part_factor(args: argparse.Namespace) -> list[dict[str, Any]]:
    import scipy.linalg as sla
    from threadpoolctl import threadpool_limits

    rows = []
    for m in args.factor_widths:
        x = torch.randn(2 * m, m, dtype=torch.float64) * torch.logspace(
            0, -3, m, dtype=torch.float64
        )
        g = (x.T @ x).numpy()
        row: dict[str, Any] = {"m": m}
        for label, limit in (("1_thread", 1), ("all_threads", None)):
            with threadpool_limits(limits=limit, user_api="blas"):
                t = time.perf_counter()
                sla.qr(g, pivoting=True, mode="r", check_finite=False)
                row[f"host_pivoted_qr_{label}_s"] = time.perf_counter() - t
                t = time.perf_counter()
                sla.eigh(g, check_finite=False)
                row[f"host_eigh_{label}_s"] = time.perf_counter() - t
        if torch.cuda.is_available():
            gt = torch.from_numpy(g)
            torch.linalg.eigh(gt[:64, :64].cuda())
            torch.cuda.synchronize()
            t = time.perf_counter()
            _, v = torch.linalg.eigh(gt.cuda())
            v.cpu()
            torch.cuda.synchronize()
            row["gpu_eigh_with_transfer_s"] = time.perf_counter() - t
        rows.append(row)
        print(
            "factor:",
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    return rows


def _greedy_per_step_gemv(S: np.ndarray, M: np.ndarray, tau: float, plain: bool) -> Any:
    """The greedy of ``linalg.spectral_greedy`` as it was until stop 44: ``M c`` and
    ``(M S) c`` by an m × m matrix-vector product each, every step (all m steps, the
    rtol floor, no exhaustion shortcut: the Grams here are of full rank)."""
    m = S.shape[0]
    t = np.full(m, tau)
    QT = S if plain else np.ascontiguousarray((M @ S).T)
    num = np.einsum("ij,ji->i", QT, S)
    r = np.diag(S).copy()
    floor = 1e-12 * float(r.max())
    C, MC = np.zeros((m, m)), np.zeros((m, m))
    chosen = np.zeros(m, dtype=bool)
    order, losses = np.empty(m, dtype=np.int64), np.empty(m + 1)
    loss = float(np.sum(M * S))
    losses[0] = loss
    for step in range(m):
        d = r + t
        ok = (r > floor) & (d > 0)  # the library's candidates, ties to the lowest index
        gain = np.where(ok, np.maximum(num, 0.0) / np.where(ok, d, 1.0), 0.0)
        j = int(np.argmax(np.where(chosen, -np.inf, gain)))
        order[step], chosen[j] = j, True
        Cs = C[:, :step]
        c = (S[:, j] - Cs @ C[j, :step]) / np.sqrt(d[j])
        mc = c if plain else M @ c
        v = QT @ c - Cs @ ((Cs if plain else MC[:, :step]).T @ c)
        num = num - 2.0 * c * v + c * c * float(c @ mc)
        r = r - c * c
        C[:, step], MC[:, step] = c, mc
        loss = float(r.sum()) if plain else loss - float(c @ mc)
        losses[step + 1] = max(loss, 0.0)
    return order, losses


def part_greedy(args: argparse.Namespace) -> list[dict[str, Any]]:
    from spectrim.linalg import spectral_greedy

    rows = []
    for m in args.factor_widths:
        g = np.random.default_rng(m)
        z = g.standard_normal((2 * m, m)) @ (0.1 * g.standard_normal((m, m)) + np.eye(m))
        S = z.T @ z / (2 * m)
        w = g.standard_normal((384, m))
        W = w.T @ w
        W *= m / np.trace(W)
        tau = 1e-4 * float(np.trace(S))
        for theta in (0.5, 1.0):
            M = theta * np.eye(m) + (1 - theta) * W
            befores, afters = [], []
            for _ in range(args.greedy_repeats):  # interleaved; the fastest of each
                t = time.perf_counter()
                ref = _greedy_per_step_gemv(S, M, tau, theta == 1.0)
                befores.append(time.perf_counter() - t)
                t = time.perf_counter()
                sel = spectral_greedy(S, theta=theta, weight=W, tau=tau)
                afters.append(time.perf_counter() - t)
            before, after = min(befores), min(afters)
            row = {
                "m": m,
                "theta": theta,
                "per_step_gemv_s": before,
                "spectral_greedy_s": after,
                "speedup": before / after,
                "same_order": bool(np.array_equal(sel.order, ref[0])),
                "max_loss_difference": float(np.abs(sel.losses - ref[1]).max() / ref[1][0]),
            }
            rows.append(row)
            print("greedy:", json.dumps({k: round(v, 3) if isinstance(v, float) and k != "max_loss_difference" else v for k, v in row.items()}), flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--factor-widths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--calib", type=int, default=1000)
    ap.add_argument("--greedy-repeats", type=int, default=3, help="timings of each (greedy)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    ap.add_argument("--sketch-widths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--sketch-rows", type=int, default=16384, help="calibration rows")
    ap.add_argument("--wide-one", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--sketch-one", nargs=3, type=float, help=argparse.SUPPRESS)
    ap.add_argument("--minilm-calib", type=int, default=1024, help="MiniLM sentences (blocks)")
    ap.add_argument(
        "--blocks-models", nargs="+", choices=BLOCK_MODELS, default=["resnet56", "minilm"]
    )
    ap.add_argument("--blocks-fit", default="inputs", help="the sequential_fit of the blocks part")
    ap.add_argument(
        "--blocks-passes",
        nargs="+",
        choices=BLOCK_PASSES,
        default=["whole", "blocks"],
        help="the sequential passes of the blocks part",
    )
    ap.add_argument("--images", type=int, default=64, help="random 224² images (resnet50)")
    ap.add_argument("--blocks-one", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--procs-worker", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--offload-one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument(
        "--offload-modes",
        nargs="+",
        choices=OFFLOAD_MODES,
        default=list(OFFLOAD_MODES[:3]),
        help="the offload part's runs: where the model is, +stats: block_statistics, "
        "+cache: block_cache",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.wide_one:
        print(json.dumps(wide_one(*args.wide_one)))
        return
    if args.sketch_one:
        m, n, share = args.sketch_one
        print(json.dumps(sketch_one(int(m), int(n), share)))
        return
    if args.blocks_one:
        which, mode, calib, out, fit = args.blocks_one
        print(json.dumps(blocks_one(which, mode, int(calib), out, fit)))
        return
    if args.offload_one:
        print(json.dumps(offload_one(*args.offload_one)))
        return
    if args.procs_worker:
        r, w, init, out, calib = args.procs_worker
        procs_worker(int(r), int(w), init, out, int(calib))
        return
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "command": " ".join(sys.argv),
    }
    parts = {
        "wide": part_wide,
        "procs": part_procs,
        "device": part_device,
        "sketch": part_sketch,
        "blocks": part_blocks,
        "offload": part_offload,
        "factor": part_factor,
        "greedy": part_greedy,
    }
    for name in args.parts:
        result[name] = parts[name](args)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=float))
    tmp.replace(path)
    print("wrote", path)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
