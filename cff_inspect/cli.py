"""``cff-inspect``: the one console script, one subcommand per part of the system.

Every option is also settable by an environment variable named
``CFF_INSPECT_<OPTION>`` (upper case, dashes as underscores); a flag wins over
the variable. Errors of this project are printed as one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cff_inspect.env import ENV_PREFIX  # noqa: F401 - ENV_PREFIX re-exported
from cff_inspect.env import env_default as _env
from scorer.errors import ConfigError, InspectionError

log = logging.getLogger("cff_inspect")

ROOT = Path(__file__).resolve().parent.parent


def default_data_root() -> Path | None:
    """``../shared/datasets`` next to the project, where the shared datasets live."""
    p = ROOT.parent / "shared" / "datasets"
    return p if p.is_dir() else None


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=_env("backbone", "dinov2-vits14"),
        help="dinov2-vits14 | clip:<open_clip name> | tiny-vit | tiny-clip (default: %(default)s)",
    )
    p.add_argument("--weights", default=_env("weights"), help="local checkpoint path for the backbone")
    p.add_argument(
        "--image-size",
        type=int,
        default=_env("image_size", None, kind=int),
        help="backbone input size (default: the backbone's, 448 for dinov2-vits14)",
    )
    p.add_argument("--device", default=_env("device", "auto"), help="cpu | cuda | auto (default: %(default)s)")
    p.add_argument("--threads", type=int, default=_env("threads", None, kind=int), help="torch CPU threads")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=_env("precision", "auto"),
        help="backbone autocast for scoring: auto = bf16 on a GPU or a CPU with bf16 units, else fp32",
    )
    p.add_argument(
        "--compile",
        choices=("off", "default", "reduce-overhead", "max-autotune"),
        default=_env("compile", "off"),
        help="torch.compile the backbone (reduce-overhead adds CUDA graphs); first batches compile (default: off)",
    )


def _precision(args: argparse.Namespace, device: str) -> str:
    p = getattr(args, "precision", "auto")
    if p == "auto":
        from scorer.backbones.base import auto_precision

        return auto_precision(device)
    return p


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _backbone_from(args: argparse.Namespace):  # noqa: ANN202 - lazy torch import
    import torch

    from scorer.backbones import load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = _device(args.device)
    bb = load_backbone(args.backbone, weights=args.weights, image_size=args.image_size, device=dev)
    if getattr(args, "compile", "off") != "off":
        bb.enable_compile(args.compile)
    return bb.set_precision(_precision(args, dev))


# -- eval ----------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from scorer.evaluate import EvalConfig, markdown_table, run_eval, write_report
    from scorer.head import ScoreOptions

    data = args.data or ([str(default_data_root())] if default_data_root() else [])
    if not data:
        raise ConfigError("no --data given and ../shared/datasets does not exist")
    base_head = None
    bb = _backbone_from(args)
    if args.base_head:
        from scorer.artifact import load_head

        base_head = load_head(args.base_head, bb)
    cfg = EvalConfig(
        shots=tuple(args.shots),
        seeds=tuple(args.seeds),
        methods=tuple(args.method),
        sampling=args.sampling,
        per_stage=args.per_stage,
        batch_size=args.batch_size,
        fit_precision=args.fit_precision,
        max_test=args.max_test,
        cache_dir=args.cache_dir,
        score=ScoreOptions(
            map_size=args.map_size,
            smooth_sigma=args.smooth_sigma,
            image_score=args.image_score,
            bank_dtype=args.bank_dtype,
            letterbox=args.letterbox,
        ),
    )
    fit_options = None
    if args.fit_steps is not None or args.fit_lr_stage2 is not None or args.bank_features is not None:
        from dataclasses import replace

        from scorer.fit import FitOptions

        fit_options = FitOptions()
        if args.fit_steps is not None:
            fit_options = fit_options.with_steps(args.fit_steps)
        if args.fit_lr_stage2 is not None:
            fit_options = replace(fit_options, lr_stage2=args.fit_lr_stage2)
        if args.bank_features is not None:
            fit_options = replace(fit_options, bank_features=args.bank_features)
    report = run_eval(
        data,
        bb,
        cfg,
        base_head=base_head,
        base_head_path=args.base_head,
        fit_options=fit_options,
        progress=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(markdown_table(report))
    if args.out:
        write_report(report, args.out)
        print(f"report written to {args.out}", file=sys.stderr)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="few-shot evaluation on MVTec-layout folders")
    p.add_argument(
        "--data",
        action="append",
        default=_env("data", None, many=True),
        help="category folder or root of categories (repeatable; default ../shared/datasets)",
    )
    p.add_argument("--shots", type=int, nargs="+", default=_env("shots", [1, 2, 4], kind=int, many=True))
    p.add_argument("--seeds", type=int, nargs="+", default=_env("seeds", [0, 1, 2], kind=int, many=True))
    p.add_argument(
        "--method",
        nargs="+",
        choices=("knn", "knn-mean", "knn-auto", "aprilgan", "cff", "cff-unguarded"),
        default=_env("method", ["knn", "knn-mean", "aprilgan", "cff", "cff-unguarded"], many=True),
        help="knn: the default head (taps chosen on held-out data); knn-mean: all taps averaged; cff: guarded",
    )
    p.add_argument(
        "--letterbox",
        action="store_true",
        default=_env("letterbox", "0") not in ("0", "false", "no", ""),
        help="aspect-preserving resize (pad to square) instead of squashing; maps cover the source only",
    )
    p.add_argument("--base-head", default=_env("base_head"), help="base head from train-base (cross-dataset protocol)")
    p.add_argument("--out", default=_env("out"), help="JSON report path")
    p.add_argument(
        "--per-stage",
        action="store_true",
        default=bool(_env("per_stage", False)),
        help="also report each tapped stage's own figures",
    )
    p.add_argument("--sampling", choices=("random", "slice"), default=_env("sampling", "random"))
    p.add_argument(
        "--max-test",
        type=int,
        default=_env("max_test", None, kind=int),
        help="evaluate on a deterministic stratified subset of the test split",
    )
    p.add_argument("--batch-size", type=int, default=_env("batch_size", 8, kind=int))
    p.add_argument(
        "--fit-precision",
        choices=("fp32", "bf16", "fp16"),
        default=_env("fit_precision", "fp32"),
        help="fit heads at this precision while test images run at --precision (default: %(default)s)",
    )
    p.add_argument("--cache-dir", default=_env("cache_dir"), help="on-disk token cache (reused across runs)")
    p.add_argument("--map-size", type=int, default=_env("map_size", 256, kind=int))
    p.add_argument(
        "--bank-dtype",
        choices=("float32", "bfloat16", "float16"),
        default=_env("bank_dtype", "float32"),
        help="precision of the memory-bank search (bfloat16 is ~3x faster on CPUs with bf16 units)",
    )
    p.add_argument("--smooth-sigma", type=float, default=_env("smooth_sigma", 4.0, kind=float))
    p.add_argument("--image-score", choices=("topk", "max"), default=_env("image_score", "topk"))
    p.add_argument(
        "--bank-features",
        choices=("raw", "projected", "calibrated"),
        default=_env("bank_features"),
        help="features of the cff memory bank (default calibrated, spec A9; aprilgan and knn always use raw)",
    )
    p.add_argument(
        "--fit-lr-stage2",
        type=float,
        default=_env("fit_lr_stage2", None, kind=float),
        help="stage-2 (CFF calibration) learning rate of the per-product fit (default 1e-3)",
    )
    p.add_argument(
        "--fit-steps",
        type=int,
        default=_env("fit_steps", None, kind=int),
        help="optimisation steps per fitting stage (cff/aprilgan)",
    )
    _add_backbone_args(p)
    p.set_defaults(func=cmd_eval)


# -- not yet built ---------------------------------------------------------------
_PENDING: dict[str, tuple[str, int]] = {}


def _add_pending(sub: argparse._SubParsersAction, name: str, text: str, issue: int) -> None:
    p = sub.add_parser(name, help=f"{text} (not built yet: issue {issue})")

    def run(args: argparse.Namespace) -> int:
        print(f"cff-inspect {name}: not built yet (tracked in issue {issue})", file=sys.stderr)
        return 2

    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: scorer (batched vs reference flow), pipeline (end to end)")
    bs = p.add_subparsers(dest="bench_command", required=True)
    from benchmarks import pipeline

    q = bs.add_parser("pipeline", help="end-to-end frames/s and latency beside the bare scorer, one run")
    pipeline.add_args(q)
    q.set_defaults(func=pipeline.main)
    from benchmarks import scorer_bench

    s = bs.add_parser("scorer", help="scorer images/s and latency per batch, K, precision vs the reference")
    scorer_bench.add_arguments(s)
    s.set_defaults(func=scorer_bench.main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cff-inspect", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", default=bool(_env("verbose", False)))
    sub = parser.add_subparsers(dest="command", required=True)
    from cff_inspect import commands
    from cff_inspect import run as run_cmd

    run_cmd.add_run(sub)
    _add_eval(sub)
    commands.add_score(sub)
    commands.add_train_base(sub)
    commands.add_heads(sub)
    from cff_inspect import services

    services.add_broker(sub)
    services.add_worker(sub)
    services.add_ingest(sub)
    services.add_calibrator(sub)
    _add_bench(sub)
    for name, (text, issue) in _PENDING.items():
        _add_pending(sub, name, text, issue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return int(args.func(args) or 0)
    except InspectionError as exc:
        print(f"cff-inspect: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
