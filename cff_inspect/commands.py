"""Subcommands that drive the scorer directly: run (demo), score, train-base, heads (offline)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from calibrator.security import add_client_security_args, client_security_from
from cff_inspect.progress import add_progress_arg, from_fit_progress, renderer
from inspection_core.errors import ConfigError, ImageError
from inspection_core.ids import check_product_id
from inspection_core.names import MAX_SHOTS, MAX_SHOTS_CEILING
from inspection_core.wire import finite
from scorer.options import (
    add_backbone_args,
    add_data_arg,
    add_method_arg,
    backbone_from,
    refuse_local_backbone_options,
)


def _expand_images(items: list[str]) -> list[Path]:
    from scorer.images import IMAGE_SUFFIXES, list_images

    out: list[Path] = []
    for it in items:
        p = Path(it)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise ConfigError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return out


def _load_head_and_backbone(args: argparse.Namespace):  # noqa: ANN202
    from scorer.artifact import load_head, read_manifest

    manifest = read_manifest(args.head)
    ns = argparse.Namespace(**{**vars(args), "backbone": args.backbone or manifest["backbone"]})
    bb = backbone_from(ns, image_size=manifest["image_size"])  # threads, compile and precision apply too
    return load_head(args.head, bb), manifest


# -- score ----------------------------------------------------------------------
def output_stem(path: Path) -> str:
    """``<stem>-<8 hex of the resolved path>``: a/img.png and b/img.png (or img.jpg) must not overwrite each other."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"


def score_paths(head, paths: list[Path], out_dir: Path, *, overlays: bool = True) -> list[dict]:  # noqa: ANN001
    """Score files one by one; an unreadable file gets an error record, the rest go on.

    Outputs are named by :func:`output_stem`, so inputs with the same file name in other folders never collide.
    """
    from scorer.images import load_image
    from scorer.visualize import overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for p in paths:
        stem = output_stem(p)
        try:
            img = load_image(p)
        except ImageError as exc:
            rec = {"image": str(p), "status": "BAD_IMAGE", "error": str(exc)}
            (out_dir / f"{stem}.json").write_text(json.dumps(rec, indent=2))
            records.append(rec)
            continue
        s = head.score([img])
        verdict = "DEFECT" if bool(s.is_defect[0]) else "OK"
        regions = [asdict(r) for r in s.regions[0]]
        rec = {
            "image": str(p),
            "status": "OK",
            "verdict": verdict,
            "image_score": float(s.image_scores[0]),
            "normalized_score": finite(s.normalized_scores[0]),
            "image_threshold": finite(head.image_threshold),
            "pixel_threshold": finite(head.pixel_threshold),
            "width": img.shape[1],
            "height": img.shape[0],
            "regions": regions,
            "head": {k: head.meta.get(k) for k in ("product", "version", "path")},
        }
        if overlays:
            png = out_dir / f"{stem}_overlay.png"
            overlay(
                img,
                s.maps[0].astype("float32"),
                pixel_threshold=head.pixel_threshold,
                regions=s.regions[0],
                verdict=f"{verdict} {rec['normalized_score'] or 0:.2f}",
            ).save(png)
            rec["overlay"] = str(png)
        (out_dir / f"{stem}.json").write_text(json.dumps(rec, indent=2))
        records.append(rec)
    return records


def cmd_score(args: argparse.Namespace) -> int:
    head, _ = _load_head_and_backbone(args)
    paths = _expand_images(args.images)
    recs = score_paths(head, paths, Path(args.out), overlays=not args.no_overlay)
    bad = 0
    for r in recs:
        if r["status"] != "OK":
            bad += 1
            print(f"{r['image']}: {r['status']}: {r['error']}")
        else:
            print(
                f"{r['image']}: {r['verdict']} score={r['image_score']:.4f} "
                f"normalized={r['normalized_score'] or float('nan'):.3f} regions={len(r['regions'])}"
            )
    print(f"{len(recs) - bad} scored, {bad} unreadable; results in {args.out}", file=sys.stderr)
    return 1 if bad else 0


def add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score images with a head: verdict, scores, regions (JSON) and overlay PNGs",
        description="Score images with a head. Per image, <stem>-<hash>.json and <stem>-<hash>_overlay.png in "
        "--out; <hash> is 8 hex digits "
        "of the input's resolved path, so files with the same name in different folders do not overwrite each other.",
    )
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--head", required=True, default=None, help="head artifact (.safetensors)")
    p.add_argument("--out", default="score-out", help="output folder (default: %(default)s)")
    p.add_argument("--no-overlay", action="store_true", help="write JSON only")
    add_backbone_args(p, default=None, sized=False)
    p.set_defaults(func=cmd_score)


# -- heads ------------------------------------------------------------------------------
def _fit_option_strings(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    for kv in args.option or []:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ConfigError(f"--option expects NAME=VALUE, got {kv!r}")
        out[k.strip()] = v.strip()
    if args.steps is not None:
        out["steps"] = str(args.steps)
    if args.seed is not None:
        out["seed"] = str(args.seed)
    return out


def _print_info(h) -> None:  # noqa: ANN001 - calibrator_pb2.HeadInfo
    print(
        f"{h.head.head_id:32s} {'ACTIVE' if h.active else '      '} {h.method:8s} K={h.shots:<3d} "
        f"image_threshold={h.image_threshold:.4g} pixel_threshold={h.pixel_threshold:.4g} sha256={h.head.sha256[:12]}"
    )
    if h.selection:  # the cff guard kept another head than asked for, or says why it kept cff
        print(f"    asked for {h.requested_method}, kept {h.method}: {h.selection}")
    if h.commissioning:  # its verdicts are provisional until the line calibrates it (docs/line-calibration.md)
        print("    commissioning: verdicts are provisional until the line sets its threshold")
    if h.line_status:
        print(f"    line: {h.line_status}" + (f" - not activated: {h.candidate_reason}" if h.candidate_reason else ""))


def _client(args: argparse.Namespace):  # noqa: ANN202
    from calibrator.client import CalibratorClient

    return CalibratorClient(args.calibrator, client_security_from(args))


def cmd_heads_fit(args: argparse.Namespace) -> int:
    product = check_product_id(args.product)
    paths = _expand_images(args.refs)
    if not paths:
        raise ConfigError("no reference images given")
    options = _fit_option_strings(args)
    if args.out is None:
        refuse_local_backbone_options(args, "the calibrator fits with its own backbone; they apply with --out")
        if args.base_head or args.version != 1:
            raise ConfigError("--base-head and --version apply to offline fits (--out); the calibrator has its own")
        return _heads_fit_remote(args, product, paths, options)
    return _heads_fit_offline(args, product, paths, options)


def _heads_fit_remote(args: argparse.Namespace, product: str, paths: list[Path], options: dict[str, str]) -> int:
    t0 = time.perf_counter()
    with _client(args) as c, renderer(args) as draw:

        def progress(msg) -> None:  # noqa: ANN001 - calibrator_pb2.FitProgress: drawn like a local fit
            ev = from_fit_progress(msg)
            if ev is not None:
                draw(ev)

        info = c.fit(
            product,
            paths,
            backbone=args.backbone or "",
            method=args.method,
            activate=args.activate,
            options=options,
            progress=progress,
        )
    _print_info(info)
    print(f"fitted {info.head.head_id} on {args.calibrator} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def _heads_fit_offline(args: argparse.Namespace, product: str, paths: list[Path], options: dict[str, str]) -> int:
    from scorer.artifact import file_sha256, load_head, save_head
    from scorer.fit import FitOptions, fit_head
    from scorer.images import load_image

    if len(paths) > MAX_SHOTS_CEILING:
        raise ConfigError(f"need 1..{MAX_SHOTS_CEILING} reference images, got {len(paths)}")
    opts, seed = FitOptions(object_name=product.split(".")[0]).with_strings(options)
    refs = [load_image(p) for p in paths]
    if args.backbone is None:
        args.backbone = "dinov2-vits14"
    bb = backbone_from(args)
    base = load_head(args.base_head, bb) if args.base_head else None
    t0 = time.perf_counter()
    with renderer(args) as draw:
        head = fit_head(bb, refs, base_head=base, options=opts, method=args.method, seed=seed, progress=draw)
    head.meta["reference_sha256"] = [file_sha256(p) for p in paths]
    out = Path(args.out)
    sha = save_head(head, out, product=product, version=args.version)
    fm = head.meta.get("fit_metrics", {})
    print(
        json.dumps(
            {
                "path": str(out),
                "sha256": sha,
                "product": product,
                "method": head.method,
                "requested_method": args.method,
                "selection": (head.meta.get("guard") or {}).get("reason"),
                "shots": len(refs),
                "image_threshold": finite(head.image_threshold),
                "pixel_threshold": finite(head.pixel_threshold),
                "fit_seconds": time.perf_counter() - t0,
                "fit_metrics": fm,
            },
            indent=2,
        )
    )
    return 0


def _check_thresholds(args: argparse.Namespace) -> None:
    if args.good and args.image_threshold is not None:
        raise ConfigError("--good sets the image threshold from known-good images; give it or --image-threshold")
    if args.image_threshold is None and args.pixel_threshold is None and not args.good:
        raise ConfigError("give --image-threshold, --good (known-good images) and/or --pixel-threshold")
    for name in ("image_threshold", "pixel_threshold"):
        v = getattr(args, name)
        if v is not None and (not math.isfinite(v) or v <= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number, got {v}")


def _from_good(args: argparse.Namespace, head_file: str):  # noqa: ANN202 - a Head
    """The head in ``head_file`` re-thresholded on ``--good``'s known-good images, scored here (summary on stderr)."""
    from scorer.fit import FitOptions, threshold_from_good
    from scorer.images import load_image

    paths = _expand_images(args.good)
    head, _ = _load_head_and_backbone(argparse.Namespace(**{**vars(args), "head": head_file}))
    far = FitOptions().image_far if args.image_far is None else args.image_far  # the fit's own target by default
    out = threshold_from_good(head, [load_image(p) for p in paths], image_far=far)
    tg = out.meta["threshold_from_good"]
    summary = {
        "good_images": len(paths),
        "good_score_max": max(tg["scores"]),
        "previous_image_threshold": finite(head.image_threshold),
        "image_threshold": finite(out.image_threshold),
        "previously_flagged": sum(x >= head.image_threshold for x in tg["scores"]),
    }
    print(json.dumps(summary), file=sys.stderr)
    return out


def cmd_heads_set_threshold(args: argparse.Namespace) -> int:
    _check_thresholds(args)
    if not args.good:
        refuse_local_backbone_options(args, "they apply with --good, which scores images here")
        if args.backbone or args.image_far is not None:
            raise ConfigError("--backbone and --image-far apply with --good (known-good images to score)")
    if args.head is None:
        if not args.product:
            raise ConfigError("give --product (calibrator) or --head FILE (offline)")
        product = check_product_id(args.product)
        with _client(args) as c:
            image = args.image_threshold
            if args.good:  # score them here with the version the calibrator holds, then send the number
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    f = Path(tmp) / "head.safetensors"
                    f.write_bytes(c.download(product, args.version))
                    image = _from_good(args, str(f)).image_threshold
            info = c.set_thresholds(
                product, args.version, image=image, pixel=args.pixel_threshold, activate=args.activate
            )
        _print_info(info)
        return 0

    from scorer.artifact import load_head, read_manifest, save_head

    manifest = read_manifest(args.head)
    if args.good:
        head = _from_good(args, args.head).with_thresholds(pixel=args.pixel_threshold)
    else:
        head = load_head(args.head).with_thresholds(image=args.image_threshold, pixel=args.pixel_threshold)
    version = manifest.get("version")
    new_version = (int(version) + 1) if isinstance(version, int) else None
    out = Path(args.out or args.head)
    sha = save_head(head, out, product=manifest.get("product"), version=new_version)
    print(
        json.dumps(
            {
                "path": str(out),
                "sha256": sha,
                "version": new_version,
                "image_threshold": finite(head.image_threshold),
                "pixel_threshold": finite(head.pixel_threshold),
            },
            indent=2,
        )
    )
    return 0


def cmd_heads_inspect(args: argparse.Namespace) -> int:
    from scorer.artifact import file_sha256, read_manifest

    m = read_manifest(args.head)
    m["sha256"] = file_sha256(args.head)
    print(json.dumps(m, indent=2))
    return 0


def _add_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibrator",
        default="127.0.0.1:50051",
        help="calibrator host:port (env CFF_INSPECT_CALIBRATOR; default %(default)s)",
    )
    add_client_security_args(p)


def add_heads(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heads", help="fit, list, activate and re-threshold heads (calibrator, or offline files)")
    hs = p.add_subparsers(dest="heads_command", required=True)
    f = hs.add_parser(
        "fit",
        help="fit a head from a product's good images: on the calibrator, or offline into a file with --out",
    )
    f.add_argument("--product", required=True, help="product id, [a-z0-9][a-z0-9._-]{0,63}")
    f.add_argument(
        "--refs",
        nargs="+",
        required=True,
        help=f"reference images or folders (1..{MAX_SHOTS} on a default calibrator, up to its --max-shots; "
        f"1..{MAX_SHOTS_CEILING} offline)",
    )
    f.add_argument("--out", default=None, help="fit here, offline, into this artifact file instead of the calibrator")
    add_method_arg(f)
    f.add_argument("--base-head", default=None, help="offline: base head from train-base")
    f.add_argument("--steps", type=int, default=None)
    f.add_argument("--seed", type=int, default=None)
    f.add_argument(
        "--option", action="append", metavar="NAME=VALUE", help="fit option (e.g. lr_stage2=1e-4); repeatable"
    )
    f.add_argument("--no-activate", dest="activate", action="store_false", help="store without activating")
    f.add_argument("--version", type=int, default=1, help="offline: version written into the manifest")
    add_progress_arg(f)
    _add_remote(f)
    add_backbone_args(f, default=None)
    f.set_defaults(func=cmd_heads_fit)
    t = hs.add_parser("set-threshold", help="change a head's thresholds without refitting (a new version)")
    t.add_argument("--product", help="product on the calibrator")
    t.add_argument("--version", type=int, default=0, help="calibrator: version to start from (0 = active)")
    t.add_argument("--head", help="offline: artifact file to re-threshold")
    t.add_argument("--image-threshold", type=float)
    t.add_argument("--pixel-threshold", type=float)
    t.add_argument(
        "--good",
        nargs="+",
        metavar="PATH",
        help="known-good images or folders of the line: the image threshold is set from their scores (the fit's "
        "rule), scored here with the head's backbone",
    )
    t.add_argument(
        "--image-far",
        type=float,
        default=None,
        help="with --good: target share of good images flagged (default: the fit's, 0.01)",
    )
    t.add_argument("--out", help="offline: write here instead of replacing the file")
    t.add_argument("--no-activate", dest="activate", action="store_false", help="calibrator: keep the old active")
    _add_remote(t)
    add_backbone_args(t, default=None, sized=False)
    t.set_defaults(func=cmd_heads_set_threshold)
    i = hs.add_parser("inspect", help="print a head artifact's manifest")
    i.add_argument("head")
    i.set_defaults(func=cmd_heads_inspect)
    versions = {
        "list": None,  # every version
        "activate": "version to activate (default: the newest)",
        "rollback": None,  # always the previously active one
        "delete": "version to delete (required: deleting the active head stops inspection of the product)",
        "download": "version to download (default: the active one)",
        "finish-commissioning": None,  # the active version's, with the frames collected so far
    }
    for name, version_help in versions.items():
        q = hs.add_parser(name, help=f"{name} heads on the calibrator service")
        q.add_argument("--product", required=name != "list", default=None)
        if version_help is not None:
            q.add_argument("--version", type=int, required=name == "delete", default=0, help=version_help)
        if name == "download":
            q.add_argument("--out", required=True, help="artifact file to write (sha256 verified)")
        _add_remote(q)
        q.set_defaults(func=cmd_heads_remote, heads_command=name)


def cmd_heads_remote(args: argparse.Namespace) -> int:
    """Client of the calibrator: list, activate, rollback, delete, download, finish-commissioning."""
    product = check_product_id(args.product) if args.product else ""
    with _client(args) as c:
        if args.heads_command == "list":
            heads = c.list(product)
            if not heads:
                print("no heads" + (f" for {product}" if product else ""), file=sys.stderr)
        elif args.heads_command == "download":
            from scorer.artifact import atomic_write_bytes

            data = c.download(product, args.version)
            atomic_write_bytes(Path(args.out), data)
            print(f"{args.out}: {len(data)} bytes, sha256 verified", file=sys.stderr)
            return 0
        elif args.heads_command == "activate":
            heads = [c.activate(product, args.version)]
        elif args.heads_command == "rollback":
            heads = [c.rollback(product)]
        elif args.heads_command == "finish-commissioning":
            heads = [c.finish_commissioning(product)]
        else:
            if args.version < 1:
                raise ConfigError(f"--version must be >= 1, got {args.version}")
            heads = [c.delete(product, args.version)]
    for h in heads:
        _print_info(h)
    return 0


# -- train-base ----------------------------------------------------------------------
def cmd_train_base(args: argparse.Namespace) -> int:
    from scorer.artifact import save_head
    from scorer.fit import FitOptions
    from scorer.train import TrainOptions, train_base

    bb = backbone_from(args)
    opts = TrainOptions(
        epochs_stage1=args.epochs_stage1,
        epochs_stage2=args.epochs_stage2,
        batch_stage1=args.batch_stage1,
        batch_stage2=args.batch_stage2,
        include_train_good=args.include_train_good,
        max_images=args.max_images,
        seed=args.seed,
        fit=FitOptions(lambda_align=args.lambda_align, lr_stage2=1e-4, loss_resolution=112),
    )
    with renderer(args) as draw:
        head = train_base(bb, args.data, opts, cache_dir=args.cache_dir, progress=draw)
    sha = save_head(head, args.out, product=None, version=None)
    print(
        json.dumps(
            {
                "path": args.out,
                "sha256": sha,
                **{
                    k: head.meta[k]
                    for k in ("n_images", "n_defective", "steps_stage1", "steps_stage2", "train_seconds")
                },
            },
            indent=2,
        )
    )
    return 0


def add_train_base(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-base", help="train a base head (stage 1 + 2) on auxiliary data with masks")
    add_data_arg(p, "auxiliary MVTec-layout folder (its test split with masks is used); repeatable", required=True)
    p.add_argument("--out", required=True, help="base head artifact path")
    p.add_argument("--epochs-stage1", type=int, default=3)
    p.add_argument("--epochs-stage2", type=int, default=3)
    p.add_argument("--batch-stage1", type=int, default=8)
    p.add_argument("--batch-stage2", type=int, default=16)
    p.add_argument(
        "--lambda-align", type=float, default=0.1, help="0 gives the spec's 'stage 2 without alignment' control"
    )
    p.add_argument("--include-train-good", action="store_true", help="add train/good images as extra normals")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dir", default=None, help="on-disk token cache")
    add_progress_arg(p)
    add_backbone_args(p)
    p.set_defaults(func=cmd_train_base)


__all__ = ["add_heads", "add_score", "add_train_base"]
