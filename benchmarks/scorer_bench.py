"""Scorer speed, side by side in one run: the fast batched path vs the April-GAN reference protocol.

    cff-inspect bench scorer [--backbone dinov2-vits14] [--device auto] [--batch-sizes 1 4 8 ...]
                             [--shots 1 4 16] [--precision fp32 bf16] [--out results.jsonl]

For each backbone: the backbone alone per precision and batch size (images/s, latency p50/p99 per
batch, model FLOPs per image and, on a GPU, the model FLOPs utilisation against a measured dense
bf16 matmul peak); the head alone per K and batch size (the memory-bank search and maps, from
tokens); the whole ``Head.score`` path per K at each batch size; and, in the same run, the reference
flow (one image at a time, fp32, a second forward pass for the memory bank, sklearn cosine on the
CPU) with the speed-up as a ratio. ``--weights random`` builds CLIP models with random weights
(speed only). ``--out`` appends the run as one JSON line (``benchmarks.report``); its metrics are each
head's best images/s and speed-up per backbone and K.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from benchmarks import report
from scorer.options import resolve_device

if TYPE_CHECKING:  # torch and the models load when a benchmark runs, not when the CLI builds its parser
    import torch


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench(fn, device: torch.device, *, repeats: int, warmup: int = 1) -> list[float]:  # noqa: ANN001
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return ts


def _stats(ts: list[float], batch: int) -> dict:
    med = statistics.median(ts)
    return {
        "batch": batch,
        "images_per_s": batch / med,
        "latency_p50_ms": 1000 * float(np.percentile(ts, 50)),
        "latency_p99_ms": 1000 * float(np.percentile(ts, 99)),
    }


def measured_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput the device really reaches (the MFU denominator)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    ts = _bench(lambda: a @ b, device, repeats=reps, warmup=2)
    return 2 * n**3 / statistics.median(ts) / 1e12


def model_flops_per_image(bb, size: int) -> float:  # noqa: ANN001
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    px = torch.zeros(1, 3, size, size, device=bb.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        bb.extract(px)
    return float(fc.get_total_flops())


def run(args: argparse.Namespace) -> dict:
    import torch

    from scorer.backbones import load_backbone
    from scorer.fit import FitOptions, fit_heads_from_features
    from scorer.head import knn_head
    from scorer.reference import reference_score

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    h, w = args.frame_size
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(max(args.batch_sizes))]
    machine = report.machine_facts(device)
    backbones: list[dict] = []
    metrics: dict[str, float] = {}
    if device.type == "cuda":
        machine["peak_bf16_tflops_measured"] = measured_peak_tflops(device, torch.bfloat16)
    for spec in args.backbone:
        weights = args.weights if args.weights != "random" or spec.startswith("clip:") else None
        bb = load_backbone(spec, weights=weights, device=device)
        if args.compile != "off":
            bb.enable_compile(args.compile)
        size = bb.image_size
        entry: dict = {"backbone": spec, "image_size": size, "grid": list(bb.grid), "compile": args.compile}
        flops = model_flops_per_image(bb, size)
        entry["model_gflops_per_image"] = flops / 1e9
        print(f"\n## {spec} at {size} px on {machine['device']}: {flops / 1e9:.1f} GFLOP per image")
        # -- backbone alone -------------------------------------------------------------
        rows = []
        for prec in args.precision:
            for b in args.batch_sizes:
                batch = frames[:b]
                with bb.precision_scope(prec):
                    ts = _bench(lambda batch=batch, bb=bb: bb.forward_images(batch), device, repeats=args.repeats)
                r = _stats(ts, b) | {"precision": prec}
                if "peak_bf16_tflops_measured" in machine:
                    r["mfu_vs_measured_bf16_peak"] = (
                        r["images_per_s"] * flops / 1e12 / machine["peak_bf16_tflops_measured"]
                    )
                rows.append(r)
                print(
                    f"backbone {prec:5s} batch {b:3d}: {r['images_per_s']:8.2f} img/s  "
                    f"p50 {r['latency_p50_ms']:8.1f} ms  p99 {r['latency_p99_ms']:8.1f} ms"
                    + (f"  MFU {100 * r['mfu_vs_measured_bf16_peak']:.1f}%" if "mfu_vs_measured_bf16_peak" in r else "")
                )
        entry["backbone_rows"] = rows
        # -- heads per K ----------------------------------------------------------------------
        entry["heads"] = []
        for k in args.shots:
            refs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(k)]
            rf = bb.embed(refs)
            fitted = fit_heads_from_features(
                bb, refs, rf, options=FitOptions(steps_stage1=1, steps_stage2=1, n_synthetic=2, bank_features="raw")
            )
            heads = {"knn": knn_head(bb, rf), "cff": fitted["cff"]}
            for name, head in heads.items():
                head = replace(head, backbone=bb)
                hrows = []
                for prec in args.precision:
                    bank_dtype = "float32" if prec == "fp32" else args.bank_dtype
                    fast = head.with_options(bank_dtype=bank_dtype)
                    for b in args.batch_sizes:
                        batch = frames[:b]
                        with bb.precision_scope(prec):
                            ts = _bench(lambda batch=batch, fast=fast, b=b: fast.score(batch, batch_size=b), device,
                                        repeats=args.repeats)  # fmt: skip
                        hrows.append(_stats(ts, b) | {"precision": prec, "bank_dtype": bank_dtype})
                best = max(hrows, key=lambda r: r["images_per_s"])
                fp32 = [r for r in hrows if r["precision"] == "fp32"]
                best_fp32 = max(fp32, key=lambda r: r["images_per_s"]) if fp32 else None
                # agreement of the fastest setting with fp32 on the same frames (image scores, relative)
                n_chk = min(args.reference_images, len(frames))
                ref32 = head.score(frames[:n_chk]).image_scores
                with bb.precision_scope(best["precision"]):
                    got = head.with_options(bank_dtype=best["bank_dtype"]).score(frames[:n_chk]).image_scores
                rel = float(np.max(np.abs(got - ref32) / np.maximum(np.abs(ref32), 1e-6)))
                rec = {"method": name, "shots": k, "rows": hrows, "best": best, "best_fp32": best_fp32,
                       "max_rel_score_diff_vs_fp32": rel}  # fmt: skip
                if not args.no_reference:
                    n_ref = min(args.reference_images, len(frames))
                    t0 = time.perf_counter()
                    reference_score(head, frames[:n_ref])
                    ref_ips = n_ref / (time.perf_counter() - t0)
                    rec["reference_images_per_s"] = ref_ips
                    rec["speedup_vs_reference"] = best["images_per_s"] / ref_ips
                    if best_fp32 is not None:
                        rec["speedup_fp32_vs_reference"] = best_fp32["images_per_s"] / ref_ips
                entry["heads"].append(rec)
                key = f"{spec}/{name}/K={k}"
                metrics[f"{key}/images_per_s"] = best["images_per_s"]
                if "speedup_vs_reference" in rec:
                    metrics[f"{key}/speedup_vs_reference"] = rec["speedup_vs_reference"]
                print(
                    f"{name:4s} K={k:<2d} Head.score best {best['precision']} batch {best['batch']:3d}: "
                    f"{best['images_per_s']:8.2f} img/s (p99 {best['latency_p99_ms']:.0f} ms per batch, "
                    f"scores within {100 * rel:.2f}% of fp32)"
                    + (
                        f"  reference {rec['reference_images_per_s']:.2f} img/s"
                        f"  speed-up x{rec['speedup_vs_reference']:.2f}"
                        + (
                            f" (fp32 x{rec['speedup_fp32_vs_reference']:.2f})"
                            if "speedup_fp32_vs_reference" in rec
                            else ""
                        )
                        if "reference_images_per_s" in rec
                        else ""
                    )
                )
        backbones.append(entry)
    return report.record("bench.scorer", machine, report.params_of(args), metrics, backbones=backbones)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", nargs="+", default=["dinov2-vits14"])
    p.add_argument("--weights", default=None, help="checkpoint path, or 'random' for CLIP speed runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 4 8 (CPU), 1..64 (GPU)")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--precision", nargs="+", default=None, help="fp32 bf16 fp16 (default: fp32 bf16)")
    p.add_argument("--bank-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--reference-images", type=int, default=4, help="images through the slow reference flow")
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--frame-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--compile", default="off", help="off | default | reduce-overhead (CUDA graphs) | max-autotune")
    p.add_argument("--out", default=None, help="append the run here as one JSON line")


def main(args: argparse.Namespace) -> int:
    args.device = resolve_device(args.device)
    gpu = args.device.startswith("cuda")
    args.batch_sizes = args.batch_sizes or ([1, 2, 4, 8, 16, 32, 64] if gpu else [1, 4, 8])
    args.precision = args.precision or ["fp32", "bf16"]
    report.write(run(args), args.out)
    return 0
