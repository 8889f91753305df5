"""``spectrim`` command line: a thin layer over :func:`spectrim.compress` and friends.

Example::

    $ spectrim list
    $ spectrim compress --model resnet56-cifar10 --data cifar10 --target macs=0.5 --out small/
    $ spectrim eval --model small/ --data cifar10
    $ spectrim analyze --model resnet56-cifar10 --data cifar10 --out r56-report/
    $ spectrim demo --quick

Errors are printed as one line on stderr with exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import NoReturn

from spectrim.cli._common import (
    CLIError,
    add_data_options,
    fraction,
    method_option,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_floats,
    positive_int,
)
from spectrim.config import SEQUENTIAL_FITS, CompressConfig

__all__ = ["build_parser", "main"]

_MAIN_EPILOG = """\
Examples:
  spectrim list
  spectrim compress --model resnet56-cifar10 --data cifar10 --target macs=0.5 --out small/
  spectrim eval --model small/ --data cifar10
  spectrim analyze --model resnet56-cifar10 --data cifar10 --calib 512 --out r56-report/
  spectrim demo --quick
  spectrim doctor

Built-in models and datasets are read from $SPECTRIM_DATA when set (offline use), else from
the download cache. Run 'spectrim COMMAND --help' for the options of a command.
"""

_EXPORT_EPILOG = """\
Examples:
  # a compressed CNN, traced on two CIFAR-10 images, checked on three others
  spectrim export --model small/ --data cifar10 --onnx small.onnx

  # a compressed (or original) Hugging Face encoder, traced on tokenised sentences
  spectrim export --model minilm-small/ --data sentences.txt --onnx minilm-small.onnx --json -

The check's largest absolute difference (max_abs_diff) is printed and written to --json.
A compressed Hugging Face folder finds its tokenizer where the original folder was.
"""

_COMPRESS_EPILOG = """\
Examples:
  # keep half of the MACs of the pretrained ResNet-56, save the result in small/
  spectrim compress --model resnet56-cifar10 --data cifar10 --target macs=0.5 --out small/

  # your own model (torch.save(model) or TorchScript) and image folder, JSON to stdout
  # (a TorchScript file loads as it is; a pickled torch.save(model) needs --trust-pickle,
  # which runs code from the file)
  spectrim compress --model my_model.pt --data images/ --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 \\
      --target params=0.4 --calib 500 --json -

  # quick check with fewer examples and a latency measurement
  spectrim compress --model resnet20-cifar10 --data cifar10 --calib 200 --eval-limit 200 \\
      --target macs=0.7 --latency --json result.json

  # the most accurate CNN without fine-tuning: every block's conv refitted on its own
  # outputs, cancelling the residual stream's drift (90.5% top-1 here, dense 92.6%)
  spectrim compress --model resnet56-cifar10 --data cifar10 --method spectral \
      --target macs=0.5 --sequential-fit residual --out small/

  # ... and the layers that read the drifted stream (each block's first conv, the
  # classifier) refitted too, on all 1000 calibration images (ResNet-20: 85.8%, dense 91.5%)
  spectrim compress --model resnet20-cifar10 --data cifar10 --calib 1000 --method spectral \
      --target macs=0.5 --refit-readers --sequential-fraction 1.0 --out small/

  # spectral pruning, output-aware selection, per-layer widths from N(lambda) at alpha
  spectrim compress --model resnet56-cifar10 --data cifar10 --method spectral \\
      --option theta=0.25 --target dof=1e-4 --json -

  # weight sparsification: SparseGPT-style OBS to 70% zeros, kept weights refit, saved
  # compactly (bitmask + values); or the 2:4 pattern; or the l_q bound sizing itself
  spectrim compress --model resnet20-cifar10 --data cifar10 --calib 256 --method obs \
      --target sparsity=0.7 --option refit=true --out sparse/
  spectrim compress --model resnet20-cifar10 --data cifar10 --method wanda --target sparsity=2:4
  spectrim compress --model resnet20-cifar10 --data cifar10 --method lq --target auto

  # channels first, then half of the remaining weights, one run and one report
  spectrim compress --model resnet20-cifar10 --data cifar10 --target macs=0.5 \
      --then obs:sparsity=0.5

  # a Hugging Face (or sentence-transformers) folder and a text file, tokenised with the
  # model's own tokenizer: half of every FFN, then a quarter of the attention heads
  spectrim compress --model all-MiniLM-L6-v2/ --data sentences.txt --calib 512 \
      --target width=0.5 --then id:heads=0.75 --out minilm-small/
  spectrim compress --model my-bert/ --data reviews.csv --text-column review --target heads=0.5
  # a LLaMA-style decoder with grouped-query attention: half the query heads of every KV
  # group, the keys and values kept (without --query-heads whole KV groups go)
  spectrim compress --model my-llama/ --data wiki.txt --target heads=0.5 --query-heads
  # a mixture-of-experts decoder: half the neurons of every expert, each expert its own
  spectrim compress --model my-mixtral/ --data wiki.txt --target experts=0.5
  # a tenth of the hidden size (the residual stream), readers refitted
  spectrim compress --model all-MiniLM-L6-v2/ --data sentences.txt --target hidden=0.9
  # half the MACs, the allocator choosing between attention heads and FFN neurons
  spectrim compress --model all-MiniLM-L6-v2/ --data sentences.txt --target macs=0.5 --heads
  # ... and the hidden size too, all on one budget
  spectrim compress --model all-MiniLM-L6-v2/ --data sentences.txt --target macs=0.5 \
      --heads --hidden
  # a mixture-of-experts decoder at 60% of its MACs: experts, heads and stream on one budget
  spectrim compress --model my-mixtral/ --data wiki.txt --target macs=0.6 --experts --heads \
      --hidden

  # half the MACs, the widths chosen by 4 rounds of search on the compressed model's
  # outputs (each candidate compressed and scored on the examples the fits did not use)
  spectrim compress --model resnet20-cifar10 --data cifar10 --target macs=0.5 --search 4
  # ... on text: the 512 sentences after the 512 calibration ones score the candidates
  spectrim compress --model all-MiniLM-L6-v2/ --data sentences.txt --calib 512 \
      --target macs=0.5 --heads --search 1 --search-texts 512

  # twice as fast at batch 64 on this machine, measured (channel widths multiples of 8)
  spectrim compress --model resnet56-cifar10 --data cifar10 --target latency=0.5 \
      --latency-batch 64 --round-to 8
  # forward passes and statistics on a GPU (the result is saved as usual)
  spectrim compress --model resnet56-cifar10 --data cifar10 --target macs=0.5 --device cuda
  # layers thousands of units wide, statistics held to 4 GiB (the widest are sketched),
  # corrections fitted one transformer layer at a time
  spectrim compress --model my-llm/ --data text.txt --target width=0.5 --stats-memory 4GiB \
      --blockwise
  # the original's weights left on disk (accelerate), only the compressed model in memory
  spectrim compress --model my-llm/ --data text.txt --target width=0.5 --blockwise \
      --offload-folder /tmp/offload
  # ... and each block's inputs and outputs on disk between blocks, not in memory
  spectrim compress --model my-llm/ --data text.txt --target width=0.5 \
      --offload-folder /tmp/offload --block-cache /tmp/blocks
  # ... and the statistics of one layer at a time, not of all of them
  spectrim compress --model my-llm/ --data text.txt --target width=0.5 \
      --offload-folder /tmp/offload --block-cache /tmp/blocks --block-statistics
  # half the MACs, then one epoch of distillation from the original on the JPEG train set
  spectrim compress --model resnet56-cifar10 --data cifar10 --target macs=0.5 \
      --repair-epochs 1 --repair-data cifar10-jpeg --repair-augment flip-crop --out small/
  # two processes, each on half the calibration batches, statistics summed over both
  torchrun --nproc_per_node 2 -m spectrim compress --model resnet56-cifar10 \
      --data cifar10 --target macs=0.5 --out small/

  # one budget over channels and weights: 10% of the non-zero weights, the allocator
  # choosing which widths to narrow and how sparse each matrix gets
  spectrim compress --model resnet20-cifar10 --data cifar10 --calib 256 --method id+obs \
      --target sparsity=0.9 --option refit=true

Targets: macs=F / params=F (keep a fraction F of the MACs / parameters), latency=F (keep a
fraction F of the forward time measured on this machine at --latency-batch), width=F (keep a
fraction F of every layer's channels), heads=F (keep a fraction F of every attention
layer's heads: id, spectral, l1, l2, random), hidden=F (keep a fraction F of a
transformer's hidden size: id, spectral, l1, l2, random), experts=F (keep a fraction F of the
neurons of every expert of a mixture-of-experts model: Mixtral, Qwen-MoE, OLMoE, DeepSeek-V3;
id, spectral, l1, l2, random), error=E (per-layer reconstruction error at most E),
dof=A (spectral only: per-layer width c*N(lambda), lambda = A * trace of its covariance);
for the weight methods (magnitude, random, wanda, obs, lq, lq-lasso, pqi, spectrum):
sparsity=S (a share S of every conv/Linear weight set to zero), sparsity=N:M (at most N
non-zeros in every M consecutive inputs) or auto (lq, pqi, lq-lasso size themselves).
--data FOLDER: class subfolders (root/<class>/*.png), optionally under train/ and test/;
without split subfolders the first --calib examples calibrate and the rest evaluate:
every class in turn, or (texts, data without class labels) in a random order drawn from
--seed, so a sorted file still gives a uniform sample (--file-order: the file's order).
"""

_EVAL_EPILOG = """\
Examples:
  # a folder written by 'spectrim compress --out': compared with its original model
  spectrim eval --model small/ --data cifar10

  # any model, against an explicit reference, on the first 500 test images
  spectrim eval --model my_small.pt --reference my_model.pt --data cifar10 --limit 500 --json -

  # a compressed Hugging Face model on a text file: the cosine of its mean-pooled outputs
  # to the original folder's (found where it was when compressed); on the file it was
  # calibrated on, its calibration texts are left out (--include-calibration keeps them)
  spectrim eval --model minilm-small/ --data sentences.txt --limit 1000
"""

_ANALYZE_EPILOG = """\
Examples:
  # the compressibility report of the pretrained ResNet-56 (open r56-report/report.html)
  spectrim analyze --model resnet56-cifar10 --data cifar10 --calib 512 --out r56-report/

  # your own model and images, held out from the calibration set, JSON to stdout
  spectrim analyze --model my_model.pt --data images/ --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 \\
      --heldout 0 --out report/ --json -

  # quicker: fewer sensitivity runs, a looser error budget
  spectrim analyze --model resnet20-cifar10 --data cifar10 --calib 256 --heldout 128 \\
      --error 0.2 --max-sensitivity-groups 5 --out r20-report/

  # a Hugging Face folder on text: the FFN widths, errors checked on the next 256 texts
  spectrim analyze --model all-MiniLM-L6-v2/ --data sts-train.csv --text-column 5,6 \\
      --calib 512 --out minilm-report/

Writes DIR/report.html (self-contained, plots embedded), report.md, report.json and the PNG
plots. lambda = alpha * trace(Sigma) per layer (--alphas sets the alphas). --heldout N takes
the first N labelled test examples (accuracy kept = accuracy relative to the original's);
--heldout 0 holds out the last quarter of the calibration examples instead (with their
labels when the data has any). Without labels, accuracy kept = agreement with the original's
top-1 predictions. Formulas: docs/analyze.md.
"""

_DEMO_EPILOG = """\
Examples:
  spectrim demo                 # every method at macs=0.75, 0.5 and 0.35 (about a minute)
  spectrim demo --quick         # one target (macs=0.5)
  spectrim demo --methods id,l1 --targets macs=0.5,params=0.3 --json demo.json

Trains a small CNN on the scikit-learn 8x8 digits (bundled with scikit-learn, no download),
then compresses it with each method and compares accuracy and agreement with the original.
"""

_DOCTOR_EPILOG = """\
Examples:
  spectrim doctor
  spectrim doctor --json -          # the same as JSON
  spectrim doctor --no-verify       # skip hashing the data files

Exit code 1 when a data file is present but fails its checksum (it would be refused when
used), 0 otherwise.
"""

_LIST_EPILOG = """\
Examples:
  spectrim list
  spectrim list --json -
"""

_BENCH_EPILOG = """\
Examples (from a source checkout; the scripts are not in the wheel):
  spectrim bench                                   # list the benchmarks
  spectrim bench resnet56 -- --methods id --targets macs=0.5
  spectrim bench side_by_side --smoke              # the few-second run the tests make
  spectrim bench --json -                          # the list as JSON

Each benchmark prints its table and writes its JSON (and plots) where its --out says,
by default benchmarks/results/. With --smoke the output goes to a temporary folder unless
--out is given after '--'. The exit code is the benchmark's.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common_options(parser: argparse.ArgumentParser, *, data: bool = True) -> None:
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="write the results as JSON to FILE ('-': stdout, text then goes to stderr)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or text")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    if data:
        parser.add_argument(
            "--batch-size",
            type=positive_int,
            default=256,
            metavar="N",
            help="evaluation batch size (default: 256)",
        )


def _text_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Options for text data (a Hugging Face ``--model``, a text ``--data`` file)."""
    text = parser.add_argument_group(
        "options for text (--model a Hugging Face folder, --data a .txt/.csv/.tsv/.jsonl file)"
    )
    text.add_argument(
        "--text-column",
        metavar="NAME|N[,...]",
        help="the CSV column or JSON field holding the texts, or several comma-separated "
        "(each row gives one text per column: sentence pairs, e.g. 5,6); default: a column "
        "named 'text', else the one with the longest texts (the output says which)",
    )
    _header_option(text)
    text.add_argument(
        "--max-length",
        type=positive_int,
        default=128,
        metavar="N",
        help="truncate texts to N tokens (default: 128)",
    )
    text.add_argument(
        "--text-batch",
        type=positive_int,
        default=32,
        metavar="N",
        help="texts per calibration batch, padded (padding never enters the statistics; "
        "default: 32)",
    )
    return text


def _header_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--text-header",
        choices=("auto", "yes", "no"),
        default="auto",
        help="whether a CSV/TSV file's first row names its columns (default: auto, yes "
        "unless one of its fields is a number; 'no' keeps a first row of plain sentences)",
    )


def _trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a pickled model file (torch.save(model)), or a folder whose "
        "original model is one; unpickling EXECUTES CODE from the file: only for files "
        "you trust (TorchScript files, zoo models and saved folders need no such flag)",
    )


def _overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing non-empty --out folder, and everything in it (the old "
        "folder stays intact until the new one is complete)",
    )


def _model_and_data(
    parser: argparse.ArgumentParser,
    model_help: str = "zoo model name, model file (torch.save(model) or TorchScript), "
    "compressed folder, or Hugging Face model folder (config.json + weights)",
) -> None:
    """The required ``--model`` and ``--data`` options."""
    parser.add_argument("--model", required=True, metavar="NAME|FILE|DIR", help=model_help)
    parser.add_argument(
        "--data",
        required=True,
        metavar="NAME|PATH",
        help="dataset name, image folder, .pt/.npz tensors (images or N×F features), .csv of "
        "features (a y/label/target column: labels), or a text file (.txt/.tsv/.jsonl, or "
        ".csv) for a Hugging Face model",
    )


def _subparser(
    sub: argparse._SubParsersAction, name: str, help: str, epilog: str, description: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(description, width=88),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``spectrim`` argument parser."""
    from spectrim import __version__
    from spectrim.cli import commands
    from spectrim.methods import available

    parser = _Parser(
        prog="spectrim",
        description="Compress trained PyTorch models by interpolative-decomposition pruning.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"spectrim {__version__}")
    parser.add_argument(
        "--debug", dest="debug_global", action="store_true", help="show tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # compress ------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "compress",
        "compress a model and evaluate it",
        _COMPRESS_EPILOG,
        "Compress a trained model with calibration data, evaluate it against the original "
        "and optionally save it (reload with spectrim.io.load_compressed).",
    )
    _model_and_data(p)
    p.add_argument(
        "--method",
        default="id",
        help=f"compression method: {', '.join(available())} (default: id), or a "
        "CHANNEL+WEIGHT pair such as id+obs sharing one budget (sparsity=S, macs=F, params=F)",
    )
    p.add_argument(
        "--target",
        default="macs=0.5",
        help="what to reach (default: macs=0.5; weight methods: sparsity=S, sparsity=N:M, auto)",
    )
    p.add_argument(
        "-o",
        "--option",
        type=method_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, repeatable (spectral: theta, alpha, tau, c; id: ridge; "
        "weight methods: refit, scope, structured; obs: damp, blocksize; lq: q, eta; ...)",
    )
    p.add_argument(
        "--heads",
        action="store_true",
        help="also remove whole attention heads (Hugging Face models) on the same macs/params "
        "budget as the channels: the allocator trades heads against FFN neurons",
    )
    p.add_argument(
        "--query-heads",
        action="store_true",
        help="with grouped-query attention (LLaMA-3, Mistral, Qwen2), remove query heads inside "
        "every KV group (the same number from each; keys and values stay) instead of whole "
        "KV groups, under heads=F or --heads",
    )
    p.add_argument(
        "--hidden",
        action="store_true",
        help="also narrow the residual width (hidden size) of Hugging Face transformers on "
        "the same macs/params budget: the allocator trades it against heads and channels",
    )
    p.add_argument(
        "--experts",
        action="store_true",
        help="also narrow the neurons of every expert of mixture-of-experts layers (Mixtral, "
        "Qwen-MoE, OLMoE, ...) on the same macs/params budget: the allocator chooses each "
        "layer's width against heads, channels and the residual width",
    )
    p.add_argument(
        "--then",
        metavar="METHOD:TARGET",
        help="a second stage on the result, in the same run and report "
        "(e.g. --method id --target macs=0.5 --then obs:sparsity=0.5)",
    )
    p.add_argument(
        "--calib",
        type=positive_int,
        default=1000,
        metavar="N",
        help="calibration examples: the first N of the training split, every class in turn; "
        "of texts or a set without class labels, N drawn at random (--seed; see "
        "--file-order) (default: 1000)",
    )
    p.add_argument(
        "--eval-limit",
        type=positive_int,
        metavar="N",
        help="evaluate on the first N examples of the test split (default: all)",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="save the compressed model to DIR (model.safetensors, manifest.json, "
        "report.json and, for a model file, a copy of it); DIR must not exist or be empty",
    )
    _overwrite_option(p)
    _trust_option(p)
    p.add_argument(
        "--round-to",
        type=positive_int,
        default=1,
        metavar="N",
        help="kept widths are multiples of N (default: 1)",
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the graph self-checks before pruning (faster; for models known to work)",
    )
    p.add_argument(
        "--one-shot",
        action="store_true",
        help="fit every correction on the original model's statistics only (one forward "
        "pass; default: sequential corrections on the compressed prefix)",
    )
    p.add_argument(
        "--sequential-fraction",
        type=float,
        default=CompressConfig.sequential_fraction,
        metavar="F",
        help="share of the calibration examples the sequential corrections are fitted on, "
        "to the nearest whole batch (default: %(default)s)",
    )
    p.add_argument(
        "--sequential-select",
        action="store_true",
        help="choose each group's kept channels again in the sequential pass, from the "
        "compressed prefix (same widths; helps at a third of the MACs of CIFAR ResNets, "
        "not at half: docs/results.md)",
    )
    p.add_argument(
        "--sequential-fit",
        choices=SEQUENTIAL_FITS,
        default=CompressConfig.sequential_fit,
        help="how the sequential pass corrects a consumer: reconstruct its input channels "
        "(inputs), refit it on its own outputs with every kernel tap free (outputs), "
        "or also cancel the drift of the residual stream it is added to (residual: +2 to "
        "+15 points of top-1 on CIFAR ResNets, docs/results.md); auto (default): residual "
        "when a pruned group feeds a convolution, else inputs",
    )
    p.add_argument(
        "--refit-readers",
        action="store_true",
        help="also refit, in the sequential pass, the layers whose input drifted but that "
        "read no pruned channels (a residual block's first convolution) on their own "
        "original outputs",
    )
    p.add_argument(
        "--device",
        metavar="DEV",
        help="run the forward passes and the statistics on DEV ('cuda', 'cuda:1'; default: "
        "cpu); under torchrun each process uses its own GPU when CUDA is available",
    )
    p.add_argument(
        "--stats-memory",
        metavar="SIZE",
        help="memory for the calibration statistics, e.g. 8GiB (default: a quarter of the "
        "machine's, or of the GPU's); id selects groups whose exact Grams would not fit "
        "from randomized sketches of their activations",
    )
    p.add_argument(
        "--offload-folder",
        metavar="DIR",
        help="a Hugging Face --model: keep its weights in files under DIR (accelerate) "
        "instead of memory; only the compressed model is built in memory",
    )
    p.add_argument(
        "--blockwise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fit the sequential corrections block by block (transformer layers, residual "
        "blocks) from cached block inputs: memory for one block, the same fits (default: "
        "where the residual fit runs and the model is a chain of blocks)",
    )
    p.add_argument(
        "--block-cache",
        metavar="DIR",
        help="keep the block-by-block pass's block inputs and outputs in files under DIR "
        "between blocks instead of in memory (implies --blockwise; deleted at the end)",
    )
    p.add_argument(
        "--block-statistics",
        action="store_true",
        help="measure the calibration statistics block by block too, each block's groups "
        "solved and their Grams dropped before the next block: the statistics of one block "
        "in memory, not of every layer (implies --blockwise; one more forward pass)",
    )
    p.add_argument(
        "--search",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="N rounds of allocation search (macs= / params= targets): each group's error "
        "curve scaled up or down in turn, every candidate compressed and kept when its "
        "outputs are closer to the original's on the calibration examples the fits did not "
        "use (up to two compressions per group and round; default 0: none)",
    )
    p.add_argument(
        "--repair-epochs",
        type=positive_float,
        metavar="F",
        help="after compressing, distil the original into the result for F epochs "
        "(unlabelled: the calibration images unless --repair-data)",
    )
    p.add_argument(
        "--repair-data",
        metavar="SPEC",
        help="images to repair on: a built-in dataset (its train split, e.g. cifar10-jpeg) "
        "or a folder / .pt / .npz of your own",
    )
    p.add_argument(
        "--repair-limit",
        type=int,
        metavar="N",
        help="use the first N repair images (every class in turn)",
    )
    p.add_argument(
        "--repair-lr", type=positive_float, default=0.01, metavar="LR",
        help="repair learning rate (cosine to 0; default: %(default)s; about 1e-4 for adamw)",
    )  # fmt: skip
    p.add_argument(
        "--repair-warmup", type=float, default=0.0, metavar="F",
        help="raise the repair learning rate linearly over the first fraction F of the "
        "steps (default: 0, none)",
    )  # fmt: skip
    p.add_argument(
        "--repair-average", type=float, default=0.0, metavar="DECAY",
        help="return the moving average of the repaired weights with this decay per step, "
        "e.g. 0.99 (default: 0, the last weights)",
    )  # fmt: skip
    p.add_argument(
        "--repair-mix", type=float, default=0.0, metavar="ALPHA",
        help="blend each repair image with another of its batch, λ ~ Beta(ALPHA, ALPHA), "
        "teacher and student on the same blend (mixup; default: 0, off)",
    )  # fmt: skip
    p.add_argument(
        "--repair-optimizer", choices=("sgd", "adamw"), default="sgd",
        help="repair optimiser: SGD with Nesterov momentum (default) or AdamW (transformers)",
    )  # fmt: skip
    p.add_argument(
        "--repair-features", type=float, default=0.0, metavar="W",
        help="also match the outputs of the model's blocks (residual blocks, transformer "
        "layers), with weight W (default: 0, the model's outputs alone)",
    )  # fmt: skip
    p.add_argument(
        "--repair-augment",
        choices=("none", "flip", "flip-crop"),
        default="none",
        help="augment image batches while repairing (default: none)",
    )
    p.add_argument(
        "--on-unreachable",
        choices=("stop", "raise", "force"),
        default=CompressConfig.on_unreachable,
        help="when pinned layers make a macs/params target unreachable: stop where no "
        "layer's predicted error exceeds --max-error (default), raise an error, or force "
        "every layer to its minimum width",
    )
    p.add_argument(
        "--max-error",
        type=positive_float,
        default=CompressConfig.max_error,
        metavar="E",
        help="largest predicted relative error of a layer when the target is unreachable "
        "(default: %(default)s)",
    )
    text = _text_options(p)
    text.add_argument(
        "--search-texts",
        type=positive_int,
        metavar="N",
        help="with --search: the N texts after the calibration ones score the search's "
        "candidates (a transformer's FFN fits use every calibration text, so --search on "
        "text needs them); the evaluation takes the texts after those",
    )
    p.add_argument(
        "--latency", action="store_true", help="measure CPU latency of original vs compressed"
    )
    p.add_argument(
        "--latency-batch",
        type=positive_int,
        default=32,
        metavar="N",
        help="batch size for --latency and the batch a latency=F target is measured at "
        "(default: 32)",
    )
    p.add_argument(
        "--latency-repeats",
        type=positive_int,
        default=20,
        metavar="N",
        help="timed calls for --latency (default: 20)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print the per-layer table")
    _common_options(p)
    add_data_options(p)
    p.set_defaults(func=commands.run_compress)

    # eval ----------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "eval",
        "evaluate a model (or a compressed folder)",
        _EVAL_EPILOG,
        "Evaluate a model's accuracy, parameters and MACs; with a reference model also the "
        "agreement of their predictions and the logit error.",
    )
    _model_and_data(p, "zoo model name, model file, or a folder from 'spectrim compress --out'")
    p.add_argument(
        "--reference",
        metavar="NAME|FILE|DIR",
        help="model to compare with (default for a compressed folder: its original model)",
    )
    p.add_argument("--no-reference", action="store_true", help="do not compare with a reference")
    _trust_option(p)
    p.add_argument(
        "--limit", type=positive_int, metavar="N", help="first N test examples (default: all)"
    )
    p.add_argument(
        "--include-calibration",
        action="store_true",
        help="on the data a compressed folder was calibrated on, evaluate its calibration "
        "examples too (default: they are left out, as 'compress' left them out)",
    )
    p.add_argument(
        "--latency", action="store_true", help="measure CPU latency against the reference"
    )
    p.add_argument(
        "--text-column",
        metavar="NAME|N[,...]",
        help="CSV column(s) / JSON field of texts (default: 'text', else the longest texts)",
    )
    _header_option(p)
    p.add_argument(
        "--max-length", type=positive_int, default=128, metavar="N", help="tokens per text"
    )
    p.add_argument(
        "--latency-batch",
        type=positive_int,
        default=32,
        metavar="N",
        help="batch size for --latency and the batch a latency=F target is measured at "
        "(default: 32)",
    )
    _common_options(p)
    add_data_options(p)
    p.set_defaults(func=commands.run_eval)

    # export --------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "export",
        "export a (compressed) model to ONNX, checked with onnxruntime",
        _EXPORT_EPILOG,
        "Export a model to ONNX with a dynamic batch axis (and token axis for text), traced "
        "on the first examples of --data, then run the file with onnxruntime on other "
        "examples and report the largest absolute difference from PyTorch's outputs.",
    )
    _model_and_data(
        p,
        "zoo model name, model file, folder from 'spectrim compress --out', or Hugging Face "
        "model folder",
    )
    p.add_argument("--onnx", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --onnx file")
    _trust_option(p)
    p.add_argument(
        "--example-batch",
        type=positive_int,
        default=2,
        metavar="N",
        help="examples to trace the model with (default: 2; the check uses a different count)",
    )
    p.add_argument(
        "--text-column",
        metavar="NAME|N[,...]",
        help="CSV column(s) / JSON field of texts (default: 'text', else the longest texts)",
    )
    _header_option(p)
    p.add_argument(
        "--max-length", type=positive_int, default=128, metavar="N", help="tokens per text"
    )
    _common_options(p, data=False)
    add_data_options(p)
    p.set_defaults(func=commands.run_export)

    # analyze -------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "analyze",
        "compressibility report: spectra, N(lambda), ID error curves, plots",
        _ANALYZE_EPILOG,
        "Measure how compressible each layer of a trained model is: eigenvalue spectra, "
        "degrees of freedom N(lambda), effective rank, interpolative-decomposition error "
        "curves and predicted widths, PQ index and stable rank of the weights, and how well "
        "the theory predicts held-out reconstruction errors and the accuracy kept when one "
        "layer alone is compressed. Writes an HTML page, Markdown, JSON and PNG plots.",
    )
    _model_and_data(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="write the report files to DIR (must not exist or be empty)",
    )
    _overwrite_option(p)
    _trust_option(p)
    p.add_argument(
        "--calib",
        type=positive_int,
        default=512,
        metavar="N",
        help="calibration examples: the first N of the training split, every class in turn; "
        "of texts or a set without class labels, N drawn at random (--seed; see "
        "--file-order) (default: 512)",
    )
    p.add_argument(
        "--heldout",
        type=nonneg_int,
        default=256,
        metavar="N",
        help="held-out examples, the first N of the test split (text: the N texts after the "
        "calibration ones); 0: hold out the last quarter of the calibration examples "
        "(default: 256)",
    )
    p.add_argument(
        "--error",
        type=nonneg_float,
        default=0.1,
        metavar="E",
        help="relative ID error that defines each layer's predicted width (default: 0.1)",
    )
    p.add_argument(
        "--alphas",
        type=positive_floats,
        default=(1e-4, 1e-3, 1e-2, 1e-1),
        metavar="A1,A2",
        help="relative ridge levels, lambda = alpha*trace (default: 1e-4,1e-3,1e-2,1e-1)",
    )
    p.add_argument(
        "--sensitivity-fraction",
        type=fraction,
        default=0.25,
        metavar="F",
        help="kept share of channels when one layer alone is compressed (default: 0.25)",
    )
    p.add_argument(
        "--max-sensitivity-groups",
        type=nonneg_int,
        metavar="N",
        help="run the one-layer compressions on at most N layers, spread over depth "
        "(0: none; default: all)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the graph self-checks (faster; for models known to work)",
    )
    p.add_argument(
        "--seed",
        type=nonneg_int,
        default=0,
        help="the order texts and data without class labels are drawn in (default: 0)",
    )
    _text_options(p)
    _common_options(p)
    add_data_options(p)
    p.set_defaults(func=commands.run_analyze)

    # demo ----------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "demo",
        "train a digits CNN and compress it with every method",
        _DEMO_EPILOG,
        "Offline demonstration on the scikit-learn digits.",
    )
    p.add_argument("--quick", action="store_true", help="one target (macs=0.5)")
    p.add_argument("--methods", metavar="M1,M2", help="methods to run (default: all)")
    p.add_argument("--targets", metavar="T1,T2", help="targets, e.g. macs=0.5,params=0.3")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default: 0)")
    _common_options(p, data=False)
    p.set_defaults(func=commands.run_demo_command)

    # doctor --------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "doctor",
        "versions, threads, data files and their checksums",
        _DOCTOR_EPILOG,
        "Report the installed versions (torch, NumPy, SciPy, optional extras), the thread "
        "settings, the data root and download cache with every registered file and whether "
        "it matches its sha256, and whether Chromium is there for the HTML report test.",
    )
    p.add_argument("--no-verify", action="store_true", help="do not hash the data files")
    _common_options(p, data=False)
    p.set_defaults(func=commands.run_doctor)

    # list ----------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "list",
        "list methods, models and datasets",
        _LIST_EPILOG,
        "List the available compression methods, zoo models and datasets.",
    )
    _common_options(p, data=False)
    p.set_defaults(func=commands.run_list)

    # bench ---------------------------------------------------------------------------------
    p = _subparser(
        sub,
        "bench",
        "list or run the benchmark scripts of a source checkout",
        _BENCH_EPILOG,
        "Run one of the scripts under benchmarks/ in a child Python process (its arguments "
        "after '--'), or list them with their one-line summaries.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="benchmark to run (omit: list)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark, after --")
    p.add_argument("--smoke", action="store_true", help="the few-second run of the test suite")
    p.add_argument("--benchmarks", metavar="DIR", help="benchmarks folder (default: found)")
    _common_options(p, data=False)
    p.set_defaults(func=commands.run_bench)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    text = " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    from spectrim.zoo.download import DownloadError

    known = (CLIError, ValueError, KeyError, TypeError, OSError, ImportError, DownloadError)
    if not isinstance(exc, known) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        text += " (run with --debug for the traceback)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``spectrim`` command line; return the exit code (0 ok, 2 error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    debug = bool(getattr(args, "debug", False) or getattr(args, "debug_global", False))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"spectrim {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"spectrim {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
