"""``cff-inspect``: the one console script, one subcommand per part of the system.

Every option is also settable by an environment variable named
``CFF_INSPECT_<OPTION>`` (upper case, dashes as underscores; :func:`inspection_core.env.bind_env`); a flag
wins over the variable. Errors are printed as one line: exit 2 when the command or its input was wrong
(argparse's usage code), 3 when something failed at run time (broker, calibrator, head), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from cff_inspect.progress import add_progress_arg, renderer
from inspection_core.env import bind_env, check_env
from inspection_core.errors import ConfigError, InspectionError
from inspection_core.logs import FORMATS, LEVELS, configure, format_from_argv, say, set_format
from inspection_core.names import EVAL_METHODS
from scorer.options import add_backbone_args, add_data_arg, add_fit_precision_arg, backbone_from

log = logging.getLogger("cff_inspect")

ROOT = Path(__file__).resolve().parent.parent


def default_data_root() -> Path | None:
    """``../shared/datasets`` next to the project, where the shared datasets live."""
    p = ROOT.parent / "shared" / "datasets"
    return p if p.is_dir() else None


# -- eval ----------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from scorer.evaluate import EvalConfig, markdown_table, run_eval, write_report
    from scorer.head import ScoreOptions

    plots = bool(args.out) and not args.no_plots

    data = args.data or ([str(default_data_root())] if default_data_root() else [])
    if not data:
        raise ConfigError("no --data given and ../shared/datasets does not exist")
    base_head = None
    bb = backbone_from(args)
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
    histograms: dict | None = {} if plots else None  # pixel-score histograms for the pixel-level curves
    # the runs counter and the test features stay; each run's fit stages show only while they last
    with renderer(args, keep=("runs", "features")) as draw:
        report = run_eval(
            data,
            bb,
            cfg,
            base_head=base_head,
            base_head_path=args.base_head,
            fit_options=fit_options,
            pixel_histograms=histograms,
            progress=draw,
        )
    print(markdown_table(report))
    if args.out:
        write_report(report, args.out)  # first, so a plotting failure cannot cost the run's figures
        say(f"report written to {args.out}")
    if plots:
        from scorer.plots import write_plots

        pngs = write_plots(report, args.out, histograms)
        report["plots"] = [p.name for p in pngs]
        write_report(report, args.out)
        say(f"{len(pngs)} plots written beside it: {', '.join(p.name for p in pngs)}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="few-shot evaluation on MVTec-layout folders",
        description="Few-shot evaluation on MVTec-layout folders: a markdown table on stdout and, with --out, a "
        "strict JSON report (null where a metric is undefined) holding every test image's score per method, K "
        "and seed, with PNG plots beside it: <stem>_<category>_curves.png (image and pixel ROC / PR per K, one "
        "line per seed; pixel curves from a 2048-bin score histogram per run, the metrics themselves stay exact) and "
        "<stem>_<category>_k_vs_metric.png.",
    )
    add_data_arg(p, "category folder or root of categories (repeatable; default ../shared/datasets)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--method",
        nargs="+",
        choices=EVAL_METHODS,
        default=list(EVAL_METHODS),
        help="knn: the default head (mid-level taps, plus the first where the held-out set says it localises "
        "best); knn-mid: the mid-level taps only; knn-mean: every tap averaged; knn-auto: taps chosen on "
        "held-out data; "
        "cff: the calibrated head behind its guard; cff-unguarded: without it",
    )
    p.add_argument(
        "--letterbox",
        action="store_true",
        default=False,
        help="aspect-preserving resize (pad to square) instead of squashing; maps cover the source only",
    )
    p.add_argument("--base-head", default=None, help="base head from train-base (cross-dataset protocol)")
    p.add_argument("--out", default=None, help="JSON report path; the plots are written beside it (same stem)")
    p.add_argument(
        "--no-plots",
        action="store_true",
        default=False,
        help="write the JSON report only, no ROC / PR / K-vs-metric PNGs (env CFF_INSPECT_NO_PLOTS=1)",
    )
    p.add_argument(
        "--per-stage",
        action="store_true",
        default=False,
        help="also report each tapped stage's own figures",
    )
    p.add_argument("--sampling", choices=("random", "slice"), default="random")
    p.add_argument(
        "--max-test",
        type=int,
        default=None,
        help="evaluate on a deterministic stratified subset of the test split",
    )
    p.add_argument("--batch-size", type=int, default=8)
    add_fit_precision_arg(p, "fit heads at this precision while test images run at --precision")
    p.add_argument("--cache-dir", default=None, help="on-disk token cache (reused across runs)")
    p.add_argument("--map-size", type=int, default=256)
    p.add_argument(
        "--bank-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="precision of the memory-bank search (bfloat16 is ~3x faster on CPUs with bf16 units)",
    )
    p.add_argument("--smooth-sigma", type=float, default=4.0)
    p.add_argument("--image-score", choices=("topk", "max"), default="topk")
    p.add_argument(
        "--bank-features",
        choices=("raw", "projected", "calibrated"),
        default=None,
        help="features of the cff memory bank (default calibrated, spec A9; aprilgan and knn always use raw)",
    )
    p.add_argument(
        "--fit-lr-stage2",
        type=float,
        default=None,
        help="stage-2 (CFF calibration) learning rate of the per-product fit (default 1e-3)",
    )
    p.add_argument(
        "--fit-steps",
        type=int,
        default=None,
        help="optimisation steps per fitting stage (cff/aprilgan)",
    )
    add_progress_arg(p)
    add_backbone_args(p)
    p.set_defaults(func=cmd_eval)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from benchmarks import line, pipeline, scorer_bench

    p = sub.add_parser("bench", help="benchmarks: scorer (batched vs reference flow), pipeline (end to end)")
    bs = p.add_subparsers(dest="bench_command", required=True)
    q = bs.add_parser("pipeline", help="end-to-end frames/s and latency beside the bare scorer, one run")
    pipeline.add_args(q)
    q.set_defaults(func=pipeline.main)
    s = bs.add_parser("scorer", help="scorer images/s and latency per batch, K, precision vs the reference")
    scorer_bench.add_arguments(s)
    s.set_defaults(func=scorer_bench.main)
    r = bs.add_parser(
        "line",
        help="replay categories as a production line: static head vs commissioning vs operator feedback",
    )
    line.add_arguments(r)
    root = default_data_root()
    r.set_defaults(func=line.main, default_data=str(root) if root else None)


def _add_services(sub: argparse._SubParsersAction) -> None:
    """Each service owns its options and its entry point; the CLI only names the subcommand."""
    from calibrator import entry as calibrator_entry
    from ingest import entry as ingest_entry
    from inspection_core import broker
    from workers import entry as worker_entry

    services = (
        ("broker", "run the embedded Kafka-compatible broker (Tansu, memory; for development)", broker),
        ("worker", "score frames from Kafka (consumer group, dynamic batching)", worker_entry),
        ("ingest", "publish camera frames (folders, video files, RTSP/HTTP, USB) to Kafka", ingest_entry),
        ("calibrator", "serve the gRPC calibrator (fit, store, serve, activate heads)", calibrator_entry),
    )
    for name, text, module in services:
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.main)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cff-inspect")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: the problem (an unknown flag, a bad value) and where help is, not
    the whole usage text; subcommand parsers are made of the same class."""

    def error(self, message: str) -> typing.NoReturn:
        say(f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)", level=logging.ERROR)
        self.exit(2)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]  # noqa: ANN001, ANN201
        """An unknown flag is named with the subcommand it was given to, and that subcommand's help."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            words = [getattr(ns, d, None) for d in ("command", "heads_command", "bench_command")]
            prog = " ".join([self.prog, *filter(None, words)])
            say(
                f"{prog}: error: unrecognized arguments: {_one_line(' '.join(extra), 200)} (see {prog} --help)",
                level=logging.ERROR,
            )
            self.exit(2)
        return ns


def build_parser() -> argparse.ArgumentParser:
    from cff_inspect import commands, feedback, run, tail

    parser = Parser(prog="cff-inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="same as --log-level DEBUG")
    parser.add_argument("--log-level", choices=LEVELS, type=str.upper, default="INFO", help="default %(default)s")
    parser.add_argument("--log-format", choices=FORMATS, default="text", help="json: one object per line")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_run(sub)
    _add_eval(sub)
    commands.add_score(sub)
    commands.add_train_base(sub)
    commands.add_heads(sub)
    _add_services(sub)
    tail.add_tail(sub)
    feedback.add_feedback(sub)
    _add_bench(sub)
    return bind_env(parser, defer_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    set_format(format_from_argv(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser()
        args = check_env(parser.parse_args(argv))
        configure("DEBUG" if args.verbose else args.log_level, args.log_format)
        return int(args.func(args) or 0)
    except InspectionError as exc:
        say(f"cff-inspect: error: {_one_line(str(exc))}", level=logging.ERROR)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
