"""The CLI commands: ``compress``, ``eval``, ``analyze``, ``demo`` and ``list``."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from spectrim.calibration.text import TEXT_SUFFIXES
from spectrim.cli._common import (
    CLIError,
    check_json_dest,
    check_model_spec,
    check_out_dir,
    data_seed,
    draw_texts,
    eval_batches,
    human_stream,
    load_data,
    original_from_arch,
    progress_wrapper,
    resolve_model,
    write_json,
)

__all__ = [
    "run_analyze",
    "run_compress",
    "run_demo_command",
    "run_doctor",
    "run_eval",
    "run_list",
]


#: the entry of a compressed folder's ``report.json`` that says which examples of ``--data``
#: calibrated it, so ``eval`` on the same data leaves them out
CALIBRATION_KEY = "calibration_data"


def _calibration_record(
    spec: str, args: argparse.Namespace, first: int, columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """What ``eval`` needs to leave out the examples that calibrated a saved model: the
    data (its resolved path; a file's sha256), how its examples were ordered (the seed,
    ``None``: file order; the text columns) and how many of the first ones the model saw
    (0 when the evaluation came from a split of its own)."""
    from spectrim._files import sha256_file

    p = Path(spec).expanduser()
    return {
        "data": str(p.resolve()) if p.exists() else spec,
        "sha256": sha256_file(p) if p.is_file() else None,
        "seed": data_seed(args),
        "columns": list(columns) if columns is not None else None,
        "first": int(first),
    }


def _left_out(
    args: argparse.Namespace, resolved: Any, columns: Sequence[str] | None = None
) -> tuple[int, str]:
    """How many of ``--data``'s first examples ``eval`` leaves out, and a note saying why:
    those that calibrated a compressed folder, when ``--data`` is the data it was
    calibrated on (same file, same contents, same columns).  ``args`` takes the
    compression's order (its seed) so the same examples come first."""
    import json

    from spectrim._files import sha256_file
    from spectrim.io import REPORT_FILE

    if resolved.kind != "compressed" or resolved.folder is None or args.include_calibration:
        return 0, ""
    try:
        record = json.loads((resolved.folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0, ""
    record = record.get(CALIBRATION_KEY) if isinstance(record, dict) else None
    if not isinstance(record, dict) or not record.get("first"):
        return 0, ""
    p = Path(args.data).expanduser()
    if (str(p.resolve()) if p.exists() else args.data) != record.get("data"):
        return 0, ""
    first = int(record["first"])
    if p.is_file() and record.get("sha256") not in (None, sha256_file(p)):
        return 0, (
            f"{args.data} changed since the model was compressed: its {first} calibration "
            "examples cannot be told apart, so they are evaluated too"
        )
    if columns is not None and record.get("columns") not in (None, list(columns)):
        return 0, (
            f"the model was calibrated on column(s) {', '.join(record['columns'])} of "
            f"{args.data}, not {', '.join(columns)}: nothing left out"
        )
    seed = record.get("seed")
    reordered = ""
    if seed != data_seed(args):
        args.seed, args.file_order = (seed or 0), seed is None
        reordered = " (in the compression's order: " + (
            "file order)" if seed is None else f"seed {seed})"
        )
    return first, (
        f"leaving out the first {first} examples of {args.data}{reordered}: they calibrated "
        "this model (--include-calibration keeps them)"
    )


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _set_threads(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads:
        torch.set_num_threads(threads)


def _check_method_and_target(
    method: str, target: str, options: Sequence[tuple[str, Any]] = ()
) -> str:
    from spectrim._joint import joint_budget
    from spectrim.config import RUN_FIELDS, WEIGHT_TARGETS, Target
    from spectrim.methods import available, get_method, method_pair

    if "+" not in method and method not in available():
        raise CLIError(
            f"--method {method!r} is not a registered method (available: {', '.join(available())})"
        )
    for key, _ in options:
        if key in RUN_FIELDS:  # run settings have their own flags
            flag = "--" + key.replace("_", "-")
            raise CLIError(f"--option {key}=...: {key} is not a method option; use {flag}")
    try:
        parsed = Target.parse(target)
    except ValueError as exc:
        raise CLIError(f"--target {target!r}: {exc}") from None
    kind = "weight" if parsed.kind in WEIGHT_TARGETS else "channel"
    try:
        if "+" in method:  # CHANNEL+WEIGHT on one budget
            joint_budget(parsed)
            method_pair(method, **dict(options))
        else:
            get_method(method, kind, **dict(options))
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--method {method} --target {target}: {exc}") from None
    return str(parsed)


# ------------------------------------------------------------------------------------ compress


def run_compress(args: argparse.Namespace) -> int:
    """``spectrim compress``; under ``torchrun`` (``WORLD_SIZE > 1``) every process
    compresses on its share of the batches and rank 0 alone evaluates, saves and prints."""
    import torch.distributed as dist

    from spectrim.distributed import init_from_env

    own_group = init_from_env()
    try:
        return _run_compress(args)
    finally:
        if own_group:
            dist.destroy_process_group()


def _run_compress(args: argparse.Namespace) -> int:
    from spectrim.distributed import Team
    from spectrim.evaluation import evaluate

    if not Team().is_root:  # rank 0 alone reports: the others run quietly
        args.quiet, args.json, args.latency = True, None, False
    out = human_stream(args.json)
    t_start = time.perf_counter()
    _set_threads(args)
    target = _check_method_and_target(args.method, args.target, args.option)
    then = None
    if getattr(args, "then", None):
        method2, sep, target2 = args.then.partition(":")
        if not sep or not method2 or not target2:
            raise CLIError(f"--then {args.then!r}: expected METHOD:TARGET, e.g. obs:sparsity=0.5")
        then = {"method": method2, "target": _check_method_and_target(method2, target2)}
    model_kind = check_model_spec(args.model)
    check_json_dest(args.json)
    if args.out is not None:
        check_out_dir(args.out, args.overwrite)
    if model_kind == "hf" or _text_data(args.data, args.model, model_kind):
        return _compress_text(args, out, t_start, target, then)

    if getattr(args, "search_texts", None):
        raise CLIError(
            "--search-texts is for text data; on images --search scores the calibration "
            "images the fits did not use"
        )
    data = load_data(args.data, args.calib, args.eval_limit, args)
    assert data.calib is not None
    calib_x = data.calib.tensors[0]
    if len(calib_x) == 0:
        raise CLIError(f"--data {args.data!r}: no calibration examples")
    if len(data.eval) == 0:
        raise CLIError(f"--data {args.data!r}: no evaluation examples")
    if data.note and not args.quiet:
        print(f"note: {data.note}", file=out)
    resolved = resolve_model(
        args.model,
        example_inputs=calib_x[:4],
        trust_pickle=args.trust_pickle,
        offload_folder=args.offload_folder,
    )
    model = resolved.model.eval()

    small, report = _compress(model, calib_x, **_compress_kwargs(args, target, then))
    if not Team().is_root:
        return 0
    result = evaluate(
        small,
        eval_batches(data.eval, args.batch_size, args.quiet, "evaluation"),
        reference=model,
    )
    latency = _latency(args, model, small, data.eval.tensors[0][: args.latency_batch])
    saved = None
    if args.out is not None:
        original = resolved.file
        if resolved.kind == "compressed" and resolved.folder is not None:
            from spectrim.io import ORIGINAL_FILE

            if (resolved.folder / ORIGINAL_FILE).is_file():  # compressing a compressed model
                original = resolved.folder / ORIGINAL_FILE
        first = len(calib_x) if data.shared else 0
        record = _calibration_record(args.data, args, first)
        saved = _save(args, small, report, record, resolved.arch, original)

    summary: dict[str, Any] = {
        "model": resolved.label,
        "data": data.name,
        "method": report.method,
        "options": dict(args.option),
        "target": report.target,
        "order": data.order,
        "calibration_examples": len(calib_x),
        "eval_examples": result.n,
        **_costs(report),
        "accuracy_before": result.reference_accuracy,
        "accuracy_after": result.accuracy,
        "agreement": result.agreement,
        "fidelity": result.fidelity,
        **_outcome(report, t_start, saved, latency),
    }
    write_json(summary, args.json)

    if not args.quiet:
        if args.verbose:
            print(report.table(), file=out)
        print(
            f"{resolved.label} | {report.method} {report.target} | "
            f"params {report.params_before:,} -> {report.params_after:,} "
            f"({report.params_ratio:.3f}) | MACs {report.macs_before:,} -> "
            f"{report.macs_after:,} ({report.macs_ratio:.3f})"
            + (
                f" | non-zero weights {report.nonzeros_before:,} -> {report.nonzeros_after:,} "
                f"({report.nonzero_ratio:.3f}; sparsity {report.sparsity:.3f}"
                + (" of the pruned matrices" if report.groups else "")
                + ")"
                if report.matrices
                else ""
            ),
            file=out,
        )
        print(
            f"accuracy {_fmt(result.reference_accuracy)} -> {_fmt(result.accuracy)}, "
            f"agreement {_fmt(result.agreement)} on {result.n} {data.name} examples | "
            f"compressed in {report.seconds:.1f} s",
            file=out,
        )
        _print_tail(out, latency, report, saved)
    return 0


def _latency(
    args: argparse.Namespace, model: Any, small: Any, example: Any
) -> dict[str, Any] | None:
    """``--latency``: the original and the compressed model timed on ``example``."""
    if not args.latency:
        return None
    from spectrim.evaluation import compare_latency

    latency = compare_latency(model, small, example, warmup=3, repeats=args.latency_repeats)
    latency["device"] = "cpu"
    return latency


def _save(
    args: argparse.Namespace,
    small: Any,
    report: Any,
    record: dict[str, Any],
    arch: Any,
    original: Path | None = None,
) -> Path:
    """``--out``: the compressed model, its report and the calibration record (a copy of
    the original model file instead of ``arch`` where there is one)."""
    from spectrim.io import save_compressed

    return save_compressed(
        small,
        args.out,
        {**report.to_dict(), CALIBRATION_KEY: record},
        arch=arch if original is None else None,
        overwrite=args.overwrite,
        original_file=original,
    )


def _costs(report: Any) -> dict[str, Any]:
    """Parameter and MAC counts of a compression report, for the JSON summary."""
    return {
        "params_before": report.params_before,
        "params_after": report.params_after,
        "params_ratio": report.params_ratio,
        "macs_before": report.macs_before,
        "macs_after": report.macs_after,
        "macs_ratio": report.macs_ratio,
    }


def _outcome(
    report: Any, t_start: float, saved: Any, latency: dict[str, Any] | None
) -> dict[str, Any]:
    """The closing fields of the JSON summary: times, widths, where it went, the report."""
    out = {
        "seconds": report.seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "widths": report.widths,
        "out": str(saved) if saved is not None else None,
        "warnings": list(report.warnings),
    }
    if latency is not None:
        out["latency"] = latency
    out["report"] = report.to_dict()
    return out


def _compress(model: Any, calibration: Any, **kwargs: Any) -> Any:
    """``spectrim.compress``, its "came back unchanged" RuntimeWarning left to the report:
    the command prints ``report.warnings``, where that message comes first."""
    from spectrim.api import compress

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "compress: target .* came back unchanged", RuntimeWarning)
        return compress(model, calibration, **kwargs)


def _print_tail(out: Any, latency: dict[str, Any] | None, report: Any, saved: Any) -> None:
    """The closing lines of ``compress``: latency, warnings, where the model was saved."""
    if latency is not None:
        print(
            f"CPU latency (batch {latency['batch_size']}): "
            f"{latency['original_median'] * 1e3:.2f} ms -> "
            f"{latency['compressed_median'] * 1e3:.2f} ms "
            f"(speedup x{latency['speedup']:.2f})",
            file=out,
        )
    for warning in report.warnings:
        print(f"warning: {warning}", file=out)
    if saved is not None:
        print(f"saved to {saved}", file=out)


def _text_data(data: str, model: str, kind: str) -> bool:
    """Whether ``--data`` is text: a ``.txt``, ``.tsv`` or ``.jsonl`` file, or a ``.csv``
    for a Hugging Face model (a ``.csv`` for any other model holds tabular features)."""
    suffix = Path(data).suffix.lower()
    if suffix in (".txt", ".tsv", ".jsonl"):
        return True
    if suffix != ".csv":
        return False
    if kind == "hf":
        return True
    if kind == "compressed":
        from spectrim.io import read_manifest

        return "transformers" in (read_manifest(Path(model)).get("arch") or {})
    return False


def _compress_kwargs(args: argparse.Namespace, target: str, then: Any) -> dict[str, Any]:
    """The :func:`spectrim.compress` arguments every compress command line shares."""
    return dict(
        method=args.method,
        target=target,
        round_to=args.round_to,
        seed=args.seed,
        verify=not args.no_verify,
        sequential=not args.one_shot,
        sequential_fraction=args.sequential_fraction,
        sequential_select=args.sequential_select,
        sequential_fit=args.sequential_fit,
        refit_readers=args.refit_readers,
        on_unreachable=args.on_unreachable,
        max_error=args.max_error,
        stats_memory=args.stats_memory,
        blockwise=args.blockwise,
        block_cache=args.block_cache,
        block_statistics=args.block_statistics,
        search=args.search,
        latency_batch=args.latency_batch,
        **_repair_kwargs(args),
        heads=args.heads,
        query_heads=args.query_heads,
        hidden=args.hidden,
        experts=args.experts,
        progress=progress_wrapper("compress", args.quiet),
        then=then,
        device=_device(args),
        **dict(args.option),
    )


#: images per repair step from --repair-data
REPAIR_BATCH = 128


def _repair_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``repair=`` / ``repair_data=`` from ``--repair-*`` (nothing without --repair-epochs)."""
    if args.repair_epochs is None:
        if args.repair_data is not None:
            raise CLIError("--repair-data needs --repair-epochs")
        return {}
    augment = None if args.repair_augment == "none" else args.repair_augment
    out: dict[str, Any] = {
        "repair": {
            "epochs": args.repair_epochs,
            "lr": args.repair_lr,
            "warmup": args.repair_warmup,
            "average": args.repair_average,
            "augment": augment,
            "mix": args.repair_mix,
            "optimizer": args.repair_optimizer,
            "features": args.repair_features,
        }
    }
    if args.repair_data is not None:
        data = load_data(args.repair_data, args.repair_limit, 1, args)
        assert data.calib is not None
        out["repair_data"] = list(data.calib.tensors[0].split(REPAIR_BATCH))
    return out


def _text_columns(spec: str | None) -> str | list[str] | None:
    """``--text-column``: one column (name or number) or several, comma-separated, each
    row giving one text per column (sentence pairs: ``--text-column 5,6``)."""
    if spec is None or "," not in spec:
        return spec
    return [c.strip() for c in spec.split(",")]


def _text_column(args: argparse.Namespace) -> Any:
    """``--data`` as text, as read (:class:`~spectrim.calibration.text.TextColumn`)."""
    from spectrim.calibration.text import read_text_column

    header = {"auto": None, "yes": True, "no": False}[getattr(args, "text_header", "auto")]
    try:
        return read_text_column(
            Path(args.data), column=_text_columns(args.text_column), header=header
        )
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(f"--data: {exc}") from None


def _text_rows(args: argparse.Namespace) -> tuple[Any, list[str], str]:
    """``--data`` as text: what was read (:func:`_text_column`), the texts in the order
    drawn from ``--seed`` (or the file's), and that order in words."""
    found = _text_column(args)
    texts, order = draw_texts(found.texts, args)
    return found, texts, order


def _device(args: argparse.Namespace) -> str | None:
    """``--device``, or each torchrun process's own GPU under NCCL."""
    import torch.distributed as dist

    if args.device is None and dist.is_initialized() and dist.get_backend() == "nccl":
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return str(args.device) if args.device is not None else None


def _compress_text(
    args: argparse.Namespace, out: Any, t_start: float, target: str, then: Any
) -> int:
    """``compress`` for a Hugging Face model folder and a text file: the texts tokenised
    with the model's tokenizer and drawn in a random order (``--seed``; ``--file-order``
    keeps the file's), the first ``--calib`` calibrate, the rest (up to
    ``--eval-limit``) measure how close the compressed model's mean-pooled outputs stay
    to the original's (cosine)."""
    from spectrim.calibration.text import text_batches
    from spectrim.distributed import Team

    resolved = resolve_model(
        args.model, trust_pickle=args.trust_pickle, offload_folder=args.offload_folder
    )
    if resolved.tokenizer is None:
        raise CLIError(
            f"--data {args.data!r} is text: --model must be a Hugging Face model folder "
            "(its tokenizer turns the texts into tokens)"
        )
    path = Path(args.data)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise CLIError(
            f"--model {args.model!r} is a Hugging Face folder: --data must be a text file "
            f"({', '.join(TEXT_SUFFIXES)}), got {args.data!r}"
        )
    found, texts, order = _text_rows(args)
    calib_texts, rest = texts[: args.calib], texts[args.calib :]
    search_texts: list[str] = []
    if args.search_texts:
        if not args.search:
            raise CLIError("--search-texts N scores the candidates of --search; set --search")
        search_texts, rest = rest[: args.search_texts], rest[args.search_texts :]
        if len(search_texts) < args.search_texts:
            raise CLIError(
                f"--search-texts {args.search_texts}: only {len(search_texts)} texts in "
                f"{args.data!r} after the {len(calib_texts)} calibration ones"
            )
    note = ""
    if not rest:
        rest, note = calib_texts, "no texts left after calibration: evaluating on them"
    rest = rest[: args.eval_limit] if args.eval_limit else rest
    tok = resolved.tokenizer
    calib = text_batches(calib_texts, tok, args.text_batch, args.max_length)
    evaluation = text_batches(rest, tok, args.text_batch, args.max_length)
    if not args.quiet:
        print(f"texts: {found.describe()} of {path.name}, {order}", file=out)
        if note:
            print(f"note: {note}", file=out)
    model = resolved.model
    kwargs = _compress_kwargs(args, target, then)
    if search_texts:
        kwargs["search_data"] = text_batches(search_texts, tok, args.text_batch, args.max_length)
    small, report = _compress(model, calib, **kwargs)
    if not Team().is_root:
        return 0
    fidelity, line = _text_fidelity(small, model, evaluation)
    latency = _latency(args, model, small, evaluation[0])
    saved = None
    if args.out is not None:
        first = len(calib_texts) + len(search_texts)
        record = _calibration_record(args.data, args, first, found.columns)
        saved = _save(args, small, report, record, resolved.arch)
    summary: dict[str, Any] = {
        "model": resolved.label,
        "data": str(path),
        "method": report.method,
        "options": dict(args.option),
        "target": report.target,
        "text_columns": list(found.columns),
        "order": order,
        "calibration_texts": len(calib_texts),
        "search_texts": len(search_texts),
        "eval_texts": fidelity.pop("n"),
        **_costs(report),
        **fidelity,
        **_outcome(report, t_start, saved, latency),
    }
    write_json(summary, args.json)
    if not args.quiet:
        if args.verbose:
            print(report.table(), file=out)
        print(
            f"{resolved.label} | {report.method} {report.target} | params "
            f"{report.params_before:,} -> {report.params_after:,} ({report.params_ratio:.3f}) | "
            f"MACs {report.macs_before:,} -> {report.macs_after:,} ({report.macs_ratio:.3f})",
            file=out,
        )
        print(
            f"{line} on {summary['eval_texts']} texts | compressed in {report.seconds:.1f} s",
            file=out,
        )
        _print_tail(out, latency, report, saved)
    return 0


# ---------------------------------------------------------------------------------------- eval


def run_export(args: argparse.Namespace) -> int:
    """``spectrim export --onnx``: trace, write atomically, check with onnxruntime."""
    from spectrim.io.onnx import export_onnx

    out = human_stream(args.json)
    _set_threads(args)
    kind = check_model_spec(args.model)
    check_json_dest(args.json)
    target = Path(args.onnx)
    if target.exists() and not args.overwrite:
        raise CLIError(f"--onnx {args.onnx!r} exists; pass --overwrite to replace it")
    n = args.example_batch
    example: Any
    check: Any
    if _text_data(args.data, args.model, kind):
        from spectrim.calibration.text import text_batches

        resolved = resolve_model(args.model, trust_pickle=args.trust_pickle)
        tok = resolved.tokenizer or _tokenizer_of(resolved)
        texts = _text_rows(args)[1][: 2 * n + 1]
        example = text_batches(texts[:n], tok, n, args.max_length)[0]
        check = text_batches(texts[n:] or texts, tok, n + 1, args.max_length)[0]
    else:
        data = load_data(args.data, None, 2 * n + 1, args)
        x = data.eval.tensors[0]
        example, check = x[:n], (x[n:] if len(x) > n else x)
        resolved = resolve_model(args.model, example_inputs=example, trust_pickle=args.trust_pickle)
    try:
        result = export_onnx(resolved.model.eval(), example, target, check_inputs=check)
    except (ImportError, RuntimeError) as exc:
        raise CLIError(f"--onnx {args.onnx!r}: {exc}") from None
    result["model"] = resolved.label
    write_json(result, args.json)
    if not args.quiet:
        print(
            f"{resolved.label} -> {result['path']} ({result['bytes']:,} bytes, opset "
            f"{result['opset']}) | onnxruntime vs PyTorch: max |difference| "
            f"{result['max_abs_diff']:.3g} over {result['outputs']} output(s)",
            file=out,
        )
        if result.get("note"):
            print(f"note: {result['note']}", file=out)
    return 0


def _tokenizer_of(resolved: Any) -> Any:
    """The tokenizer of a compressed Hugging Face folder: where its original folder was."""
    where = (resolved.arch or {}).get("tokenizer")
    if not where or not Path(str(where)).is_dir():
        raise CLIError(
            f"--data is text but {resolved.label} has no tokenizer on record "
            "(compress a Hugging Face folder with 'spectrim compress --model FOLDER' to keep one)"
        )
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(where))


def run_eval(args: argparse.Namespace) -> int:
    from spectrim.evaluation import compare_latency, evaluate, profile

    out = human_stream(args.json)
    _set_threads(args)
    kind = check_model_spec(args.model)
    if args.reference is not None:
        check_model_spec(args.reference, "--reference")
    check_json_dest(args.json)
    if _text_data(args.data, args.model, kind):
        return _eval_text(args, out)
    trust = args.trust_pickle
    # a compressed folder rebuilds without example inputs, and may say which examples of
    # --data calibrated it: the evaluation leaves those out
    folder = resolve_model(args.model, trust_pickle=trust) if kind == "compressed" else None
    skip, note = _left_out(args, folder) if folder is not None else (0, "")
    data = load_data(args.data, skip or None, args.limit, args)
    if len(data.eval) == 0:
        raise CLIError(f"--data {args.data!r}: no evaluation examples")
    example = data.eval.tensors[0][:4]
    resolved = folder or resolve_model(args.model, example_inputs=example, trust_pickle=trust)
    model = resolved.model.eval()
    if skip and not data.shared:  # every example calibrated: evaluated all the same
        skip, note = 0, data.note
    if note and not args.quiet:
        print(f"note: {note}", file=out)

    reference = None
    reference_label = None
    if args.reference is not None:
        ref = resolve_model(
            args.reference, example_inputs=example, option="--reference", trust_pickle=trust
        )
        reference, reference_label = ref.model.eval(), ref.label
    elif resolved.kind == "compressed" and not args.no_reference:
        found = original_from_arch(resolved.arch, resolved.folder, trust_pickle=trust)
        if found is not None:
            reference, reference_label = found

    result = evaluate(
        model,
        eval_batches(data.eval, args.batch_size, args.quiet, "evaluation"),
        reference=reference,
    )
    cost = profile(model, example[:2])
    summary: dict[str, Any] = {
        "model": resolved.label,
        "data": data.name,
        "n": result.n,
        "calibration_left_out": skip,
        "accuracy": result.accuracy,
        "params": cost.params,
        "macs": cost.macs,
        "reference": reference_label,
        "reference_accuracy": result.reference_accuracy,
        "agreement": result.agreement,
        "fidelity": result.fidelity,
    }
    if reference is not None:
        ref_cost = profile(reference, example[:2])
        summary["params_reference"] = ref_cost.params
        summary["macs_reference"] = ref_cost.macs
        summary["params_ratio"] = cost.params / ref_cost.params if ref_cost.params else None
        summary["macs_ratio"] = cost.macs / ref_cost.macs if ref_cost.macs else None
        if args.latency:
            latency = compare_latency(
                reference, model, data.eval.tensors[0][: args.latency_batch], repeats=20
            )
            latency["device"] = "cpu"
            summary["latency"] = latency
    write_json(summary, args.json)

    if not args.quiet:
        print(
            f"{resolved.label} on {result.n} {data.name} examples: accuracy "
            f"{_fmt(result.accuracy)} | params {cost.params:,} | MACs {cost.macs:,}",
            file=out,
        )
        if reference is not None:
            print(
                f"reference {reference_label}: accuracy {_fmt(result.reference_accuracy)} | "
                f"params {summary['params_reference']:,} | MACs {summary['macs_reference']:,} | "
                f"agreement {_fmt(result.agreement)} | logit rel. error "
                f"{_fmt((result.fidelity or {}).get('rel_l2'))}",
                file=out,
            )
        _print_eval_latency(out, summary)
    return 0


def _print_eval_latency(out: Any, summary: Mapping[str, Any]) -> None:
    if "latency" in summary:
        lat = summary["latency"]
        print(
            f"CPU latency (batch {lat['batch_size']}): reference "
            f"{lat['original_median'] * 1e3:.2f} ms, model "
            f"{lat['compressed_median'] * 1e3:.2f} ms (speedup x{lat['speedup']:.2f})",
            file=out,
        )


def _text_fidelity(
    model: torch.nn.Module, reference: torch.nn.Module, batches: list[dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    """How close ``model`` stays to ``reference`` on tokenised texts, and a line saying so:
    for an encoder the cosine of the mean-pooled outputs, for a causal LM (it generates)
    the next-token agreement, the mean KL divergence and both perplexities."""
    from spectrim.evaluation import embedding_fidelity, is_causal_lm, language_model_fidelity

    if is_causal_lm(reference):
        f = language_model_fidelity(model, reference, batches)
        fields = {
            "n": f["n"],
            "eval_tokens": f["tokens"],
            "next_token_agreement": f["agreement"],
            "kl_mean": f["kl_mean"],
            "perplexity": f["perplexity"],
            "reference_perplexity": f["reference_perplexity"],
        }
        line = (
            f"next-token agreement with the original {f['agreement']:.4f}, mean KL "
            f"{f['kl_mean']:.4f} nats, perplexity {f['perplexity']:.2f} (original "
            f"{f['reference_perplexity']:.2f}) over {f['tokens']} tokens"
        )
        return fields, line
    e = embedding_fidelity(model, reference, batches)
    line = (
        f"mean-pooled output cosine to the original: mean {e['cosine_mean']:.4f}, "
        f"worst {e['cosine_min']:.4f}"
    )
    return {"n": e["n"], "cosine_mean": e["cosine_mean"], "cosine_min": e["cosine_min"]}, line


def _eval_text(args: argparse.Namespace, out: Any) -> int:
    """``eval`` of a Hugging Face model (or a compressed one) on a text file: parameters,
    MACs and, against the reference (by default the original folder a compressed one was
    made from), the cosine of the mean-pooled outputs."""
    from spectrim.calibration.text import text_batches
    from spectrim.evaluation import compare_latency, profile

    trust = args.trust_pickle
    resolved = resolve_model(args.model, trust_pickle=trust)
    tok = resolved.tokenizer or _tokenizer_of(resolved)
    found = _text_column(args)
    skip, note = _left_out(args, resolved, found.columns)  # may take the compression's seed
    # drawn from --seed: a --limit is a uniform sample, not the file's first (sorted) texts
    texts = draw_texts(found.texts, args)[0]
    if skip and len(texts) <= skip:
        skip, note = 0, "every text calibrated this model: evaluating on them all the same"
    texts = texts[skip:][: args.limit]
    if note and not args.quiet:
        print(f"note: {note}", file=out)
    batches = text_batches(texts, tok, 32, args.max_length)
    reference, reference_label = None, None
    if args.reference is not None:
        ref = resolve_model(args.reference, option="--reference", trust_pickle=trust)
        reference, reference_label = ref.model.eval(), ref.label
    elif resolved.kind == "compressed" and not args.no_reference:
        source = (resolved.arch or {}).get("tokenizer")
        if source and Path(str(source)).is_dir():
            ref = resolve_model(str(source), option="--reference")
            reference, reference_label = ref.model.eval(), ref.label
    model = resolved.model.eval()
    cost = profile(model, batches[0])
    summary: dict[str, Any] = {
        "model": resolved.label,
        "data": args.data,
        "n": len(texts),
        "calibration_left_out": skip,
        "params": cost.params,
        "macs": cost.macs,
        "reference": reference_label,
    }
    line = ""
    if reference is not None:
        fidelity, line = _text_fidelity(model, reference, batches)
        fidelity.pop("n")
        summary.update(fidelity)
        ref_cost = profile(reference, batches[0])
        summary["params_ratio"] = cost.params / ref_cost.params if ref_cost.params else None
        summary["macs_ratio"] = cost.macs / ref_cost.macs if ref_cost.macs else None
        if args.latency:
            summary["latency"] = compare_latency(reference, model, batches[0], repeats=20)
    write_json(summary, args.json)
    if not args.quiet:
        print(
            f"{resolved.label} on {len(texts)} texts | params {cost.params:,} | MACs "
            f"{cost.macs:,} (per text of the first batch)",
            file=out,
        )
        if reference is not None:
            print(
                f"against {reference_label}: params {summary['params_ratio']:.3f}, MACs "
                f"{summary['macs_ratio']:.3f}, {line}",
                file=out,
            )
        _print_eval_latency(out, summary)
    return 0


# ------------------------------------------------------------------------------------- analyze


def _labels(ds: Any) -> torch.Tensor | None:
    """The labels of a ``TensorDataset`` unless it is unlabelled (every label ``-1``)."""
    if len(ds.tensors) < 2 or ds.tensors[1].numel() == 0 or bool((ds.tensors[1] < 0).all()):
        return None
    return ds.tensors[1]


def run_analyze(args: argparse.Namespace) -> int:
    from spectrim.api import as_batches
    from spectrim.diagnostics import analyze

    out = human_stream(args.json)
    t_start = time.perf_counter()
    _set_threads(args)
    kind = check_model_spec(args.model)
    check_json_dest(args.json)
    out_dir = check_out_dir(args.out, args.overwrite)
    if _text_data(args.data, args.model, kind):
        return _analyze_text(args, out, out_dir, t_start)

    # --heldout 0 needs no test split: load a single example of it
    data = load_data(args.data, args.calib, args.heldout or 1, args)
    assert data.calib is not None
    calib_x = data.calib.tensors[0]
    if len(calib_x) == 0:
        raise CLIError(f"--data {args.data!r}: no calibration examples")
    if args.heldout and len(data.eval) == 0:
        raise CLIError(f"--data {args.data!r}: no held-out (evaluation) examples")
    if data.note and not args.quiet:
        print(f"note: {data.note}", file=out)
    resolved = resolve_model(
        args.model,
        example_inputs=calib_x[:4],
        trust_pickle=args.trust_pickle,
    )
    model = resolved.model.eval()
    options = _analyze_options(args)
    if args.heldout:
        report = analyze(
            model,
            calib_x,
            heldout=as_batches(data.eval.tensors[0], args.batch_size),
            labels=_labels(data.eval),
            **options,
        )
    else:
        calib = data.calib if _labels(data.calib) is not None else calib_x
        report = analyze(model, calib, **options)
    if args.heldout:
        report.heldout_source = f"the first {len(data.eval)} evaluation examples of {data.name}"
    return _write_analysis(args, out, out_dir, t_start, report, resolved.label, data.name)


def _analyze_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "alphas": args.alphas,
        "error": args.error,
        "sensitivity_fraction": args.sensitivity_fraction,
        "max_sensitivity_groups": args.max_sensitivity_groups,
        "verify": not args.no_verify,
        "progress": progress_wrapper("analyze", args.quiet),
    }


def _analyze_text(args: argparse.Namespace, out: Any, out_dir: Path, t_start: float) -> int:
    """``analyze`` of a Hugging Face model on a text file: the texts drawn as for
    ``compress``, the first ``--calib`` measured, the next ``--heldout`` held out (0: the
    last quarter of the calibration texts)."""
    from spectrim.calibration.text import text_batches
    from spectrim.diagnostics import analyze

    resolved = resolve_model(args.model, trust_pickle=args.trust_pickle)
    tok = resolved.tokenizer or _tokenizer_of(resolved)
    found, texts, order = _text_rows(args)
    calib, held = texts[: args.calib], texts[args.calib : args.calib + args.heldout]
    if args.heldout and not held:
        raise CLIError(
            f"--data {args.data!r}: no texts left for --heldout after the {len(calib)} "
            "calibration ones (--heldout 0 holds out a quarter of them)"
        )
    if not args.quiet:
        print(f"texts: {found.describe()} of {Path(args.data).name}, {order}", file=out)

    def batches(part: list[str]) -> list[dict[str, Any]]:
        return text_batches(part, tok, args.text_batch, args.max_length)

    options = _analyze_options(args)
    model = resolved.model.eval()
    if held:
        report = analyze(model, batches(calib), heldout=batches(held), **options)
        report.heldout_source = f"{len(held)} texts after the calibration ones ({order})"
    else:
        report = analyze(model, batches(calib), **options)
    return _write_analysis(args, out, out_dir, t_start, report, resolved.label, args.data)


def _write_analysis(
    args: argparse.Namespace,
    out: Any,
    out_dir: Path,
    t_start: float,
    report: Any,
    label: str,
    data_name: str,
) -> int:
    """Write the report's files, the JSON summary and the lines for a user."""
    written = report.write(out_dir, overwrite=args.overwrite)
    summary = report.summary()
    result: dict[str, Any] = {
        "model": label,
        "data": data_name,
        "out": str(out_dir),
        "files": {k: str(v) for k, v in written.items()},
        "wall_seconds": time.perf_counter() - t_start,
        "summary": summary,
        "report": report.to_dict(),
    }
    write_json(result, args.json)

    if not args.quiet:
        removed = summary["channels"] - summary["predicted_channels"]
        lines = [
            report.table(),
            f"{label} on {data_name}: {summary['groups']} prunable layers, "
            f"{report.n_calibration} calibration / {report.n_heldout} held-out examples "
            f"({report.heldout_source})",
            f"at relative error {report.error:g}: {removed} of {summary['channels']} channels "
            f"removable ({report.compressible_fraction:.1%})",
        ]
        if summary["mean_measured_error"] is not None:
            lines.append(
                f"predicted vs held-out error: mean {_fmt(summary['mean_predicted_error'])} vs "
                f"{_fmt(summary['mean_measured_error'])} (mean |gap| "
                f"{_fmt(summary['mean_abs_error_gap'])}, max {_fmt(summary['max_abs_error_gap'])})"
            )
        if summary["sensitivity_groups"]:
            lines.append(
                f"N(lambda)/m (alpha={report.dof_alpha:g}) vs {report.sensitivity_metric} kept at "
                f"{report.sensitivity_fraction:g} width over {summary['sensitivity_groups']} "
                f"layers: Spearman {_fmt(report.spearman, '+.3f')}, Pearson "
                f"{_fmt(report.pearson, '+.3f')}"
            )
            lines.append(
                "  Spearman of other pairings: "
                + ", ".join(
                    f"{name} {_fmt(c['spearman'], '+.3f')}"
                    for name, c in report.correlation_table.items()
                    if name != "N/m vs kept"
                )
            )
        lines += [f"warning: {w}" for w in report.warnings]
        plots = sum(1 for k in written if k not in ("json", "markdown", "html"))
        lines.append(
            f"report: {written['html']} (+ report.md, report.json, {plots} plots) | "
            f"{time.perf_counter() - t_start:.1f} s"
        )
        print("\n".join(lines), file=out)
    return 0


# ---------------------------------------------------------------------------------------- demo


def run_demo_command(args: argparse.Namespace) -> int:
    from spectrim.demo import DEFAULT_TARGETS, run_demo
    from spectrim.methods import available

    out = human_stream(args.json)
    _set_threads(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if methods is not None:
        unknown = [m for m in methods if m not in available()]
        if unknown:
            raise CLIError(
                f"--methods: unknown method(s) {', '.join(unknown)} "
                f"(available: {', '.join(available())})"
            )
    if args.targets:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    elif args.quick:
        targets = ("macs=0.5",)
    else:
        targets = DEFAULT_TARGETS
    for t in targets:
        _check_method_and_target("id", t)
    rows = run_demo(methods=methods, targets=targets, seed=args.seed, file=out)
    write_json(
        {
            "model": "DigitsCNN",
            "data": "digits",
            "methods": sorted({r["method"] for r in rows}),
            "targets": list(targets),
            "seed": args.seed,
            "rows": rows,
        },
        args.json,
    )
    return 0


# ---------------------------------------------------------------------------------------- list


def run_list(args: argparse.Namespace) -> int:
    from spectrim.methods import available
    from spectrim.zoo import DATASETS, MODELS, list_datasets, list_models

    out = human_stream(args.json)
    models = {
        name: (MODELS[name].__doc__ or "").strip().splitlines()[0].removeprefix(f"{name}: ")
        for name in list_models()
    }
    datasets = {name: DATASETS[name].description for name in list_datasets()}
    methods = available()
    write_json({"methods": methods, "models": models, "datasets": datasets}, args.json)
    if not args.quiet:
        print("methods:", file=out)
        for name in methods:
            print(f"  {name}", file=out)
        print("models (zoo names for --model; or pass a model file):", file=out)
        for name, doc in models.items():
            print(f"  {name:<20} {doc}", file=out)
        print("datasets (names for --data; or pass an image folder / .pt / .npz):", file=out)
        for name, desc in datasets.items():
            print(f"  {name:<20} {desc}", file=out)
    return 0


# --------------------------------------------------------------------------------------- bench


def run_bench(args: argparse.Namespace) -> int:
    import tempfile

    from spectrim import bench

    if args.args and args.args[0] != "--":  # spectrim's own options after NAME
        from spectrim.cli.main import build_parser

        cut = args.args.index("--") if "--" in args.args else len(args.args)
        own, rest = args.args[:cut], args.args[cut:]
        if any(not t.startswith("-") for t in own[:1]):
            raise CLIError(f"bench {args.name}: {own[0]!r}: the benchmark's arguments go after --")
        try:
            args = build_parser().parse_args(["bench", *own, args.name])
        except SystemExit:
            raise CLIError(
                f"bench {args.name}: {' '.join(own)}: not an option of spectrim bench; "
                "the benchmark's own arguments go after --"
            ) from None
        args.args = rest
    out = human_stream(args.json)
    root = bench.benchmarks_dir(args.benchmarks)
    found = bench.find(root)
    if args.name is None:
        if args.args:
            raise CLIError("bench: arguments for a benchmark need its NAME first")
        write_json(
            {
                name: {"path": str(b.path), "summary": b.summary, "smoke": b.smoke}
                for name, b in found.items()
            },
            args.json,
        )
        if not args.quiet:
            print(f"benchmarks in {root}:", file=out)
            for name, b in found.items():
                print(f"  {name:<22} {b.summary}", file=out)
        return 0
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    if args.threads is not None:  # passed on to the script, which sets its own threads
        if args.name in found and "--threads" not in found[args.name].options:
            raise CLIError(f"bench {args.name}: this benchmark takes no --threads")
        extra += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="spectrim-bench-") as tmp:
        if args.smoke and "--out" not in extra:
            extra += ["--out", str(Path(tmp) / f"{args.name}.json")]
        code = bench.run(
            found.get(args.name, args.name),
            extra,
            smoke=args.smoke,
            folder=root,
            stdout=sys.stderr if args.json == "-" else None,
        )
    write_json({"benchmark": args.name, "args": extra, "exit_code": code}, args.json)
    return code


# -------------------------------------------------------------------------------------- doctor


def run_doctor(args: argparse.Namespace) -> int:
    from spectrim.doctor import doctor, render

    out = human_stream(args.json)
    info = doctor(verify=not args.no_verify)
    write_json(info, args.json)
    if not args.quiet:
        print(render(info), file=out)
    corrupt = [r for r, f in info["data"]["files"].items() if f.get("verified") is False]
    return 1 if corrupt else 0
