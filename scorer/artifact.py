"""Head artifacts: one safetensors file, the JSON manifest in ``__metadata__``.

Never pickles. Tensors: the memory bank (float16) and, for a learned head, projections, the CFF affine
weights (``calib_*``), their fold into the projections (``folded_*``) and prototypes. A manifest's
``method`` says which head type reads them. The artifact's sha256 is the sha256 of
the whole file. Writes are atomic (temporary file, fsync, rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from inspection_core.errors import HeadError
from scorer.backbones.base import Backbone, sha256_file
from scorer.head import Head, ScoreOptions, check_compatible, head_type

FORMAT_VERSION = 1
FORMAT_NAME = "cff-inspect-head"


def _finite(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def head_to_bytes(
    head: Head,
    *,
    product: str | None = None,
    version: int | None = None,
    reference_sha256: list[str] | None = None,
    extra: dict | None = None,
) -> bytes:
    t = head.artifact_tensors()
    meta = dict(head.meta)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "product": product or meta.get("product"),
        "version": version if version is not None else meta.get("version"),
        "method": head.method,
        "backbone": head.backbone_spec,
        "weights_sha256": head.weights_id,
        "taps": list(head.taps),
        "image_size": head.image_size,
        "grid": list(head.grid),
        "bank_features": head.bank_features,
        "shots": meta.get("shots"),
        "reference_sha256": reference_sha256 or meta.get("reference_sha256") or [],
        "image_threshold": _finite(head.image_threshold),
        "pixel_threshold": _finite(head.pixel_threshold),
        "score_options": asdict(head.options),
        "fit_metrics": meta.get("fit_metrics", {}),
        "created": meta.get("created") or datetime.now(UTC).isoformat(timespec="seconds"),
        "meta": {k: v for k, v in meta.items() if k not in ("fit_metrics",)},
        **(extra or {}),
    }
    return save(t, metadata={"manifest": json.dumps(manifest, default=str)})


def save_head(head: Head, path: str | Path, **kw: object) -> str:
    """Write atomically; returns the sha256 of the file."""
    data = head_to_bytes(head, **kw)  # type: ignore[arg-type]
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(path: str | Path) -> dict:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise HeadError(f"{p}: not a safetensors head artifact")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise HeadError(f"{p}: cannot read head artifact ({exc})") from None
    if not isinstance(header, dict):
        raise HeadError(f"{p}: not a safetensors head artifact (header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or "manifest" not in meta:
        raise HeadError(f"{p}: safetensors file has no cff-inspect manifest")
    try:
        manifest = json.loads(meta["manifest"])
    except (TypeError, ValueError) as exc:
        raise HeadError(f"{p}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise HeadError(f"{p}: manifest is not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise HeadError(f"{p}: not a {FORMAT_NAME} artifact (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise HeadError(f"{p}: artifact format {manifest['format_version']} is newer than supported ({FORMAT_VERSION})")
    return manifest


def load_head(path: str | Path, backbone: Backbone | None = None) -> Head:
    """Load a head; with ``backbone`` it must have been built for that backbone."""
    p = Path(path)
    manifest = read_manifest(p)
    try:
        t = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise HeadError(f"{p}: corrupt head artifact ({exc})") from None
    if not all(f"bank.{i}" in t for i in range(len(manifest["taps"]))):
        raise HeadError(f"{p}: artifact lacks memory-bank tensors")
    allowed = {f.name for f in fields(ScoreOptions)}
    opts = ScoreOptions(**{k: v for k, v in manifest.get("score_options", {}).items() if k in allowed})
    meta = dict(manifest.get("meta") or {})
    meta.update(
        {
            "fit_metrics": manifest.get("fit_metrics", {}),
            "product": manifest.get("product"),
            "version": manifest.get("version"),
            "reference_sha256": manifest.get("reference_sha256"),
            "created": manifest.get("created"),
            "path": str(p),
        }
    )
    it, pt = manifest.get("image_threshold"), manifest.get("pixel_threshold")
    head = head_type(manifest["method"]).from_tensors(
        t,
        method=manifest["method"],
        bank_features=manifest["bank_features"],
        backbone_spec=manifest["backbone"],
        weights_id=manifest["weights_sha256"],
        taps=tuple(manifest["taps"]),
        image_size=int(manifest["image_size"]),
        grid=tuple(manifest["grid"]),
        image_threshold=float("nan") if it is None else float(it),
        pixel_threshold=float("nan") if pt is None else float(pt),
        options=opts,
        meta=meta,
    )
    if backbone is not None:
        try:
            check_compatible(head, backbone)
        except HeadError as exc:
            raise HeadError(f"{p}: {exc}") from None
        head.backbone = backbone
    return head


file_sha256 = sha256_file  # the name services use for artifact and reference hashes
