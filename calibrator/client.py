"""A client of the calibrator service, used by the CLI, `cff-inspect run` and workers."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc

from calibrator.security import ClientSecurity
from inspection_core.errors import EXIT_RUNTIME, EXIT_USAGE, InspectionError
from inspection_core.names import CHUNK_BYTES
from inspection_pb.v1 import calibrator_pb2, calibrator_pb2_grpc


class CalibratorError(InspectionError):
    """A calibrator call failed; ``code`` is the gRPC status code name (e.g. ``INVALID_ARGUMENT``)."""

    def __init__(self, address: str, rpc: str, code: str, details: str) -> None:
        super().__init__(f"calibrator {address}: {rpc}: {code}: {details}")
        self.code = code
        self.details = details

    # What the caller sent was refused (fix the command) vs the call failed (retry later): see errors.EXIT_*.
    CALLER_CODES = frozenset(
        {
            "INVALID_ARGUMENT",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "FAILED_PRECONDITION",
            "OUT_OF_RANGE",
            "RESOURCE_EXHAUSTED",
            "UNAUTHENTICATED",
            "PERMISSION_DENIED",
        }
    )

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_USAGE if self.code in self.CALLER_CODES else EXIT_RUNTIME


def _fit_requests(
    product: str, images: Sequence[tuple[str, bytes]], *, backbone: str, method: str, activate: bool, options: dict
) -> Iterator[calibrator_pb2.FitRequest]:
    yield calibrator_pb2.FitRequest(
        header=calibrator_pb2.FitHeader(
            product_id=product,
            backbone=backbone,
            shots=len(images),
            method=method,
            activate=activate,
            options={k: str(v) for k, v in options.items()},
        )
    )
    for i, (name, data) in enumerate(images):
        for j in range(0, max(1, len(data)), CHUNK_BYTES):
            last = j + CHUNK_BYTES >= len(data)
            yield calibrator_pb2.FitRequest(
                chunk=calibrator_pb2.ImageChunk(index=i, name=name, data=data[j : j + CHUNK_BYTES], last=last)
            )


class CalibratorClient:
    def __init__(self, address: str, security: ClientSecurity | None = None, *, timeout_s: float = 60.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = (security or ClientSecurity()).channel(address)
        self.stub = calibrator_pb2_grpc.CalibratorStub(self._channel)

    def __enter__(self) -> CalibratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise CalibratorError(self.address, rpc, exc.code().name, exc.details() or "") from None

    # -- calls -------------------------------------------------------------------------------------
    def fit(
        self,
        product: str,
        images: Sequence[tuple[str, bytes]] | Sequence[Path],
        *,
        backbone: str = "",
        method: str = "cff",
        activate: bool = True,
        options: dict | None = None,
        progress: Callable[[calibrator_pb2.FitProgress], None] | None = None,
        timeout_s: float = 1800.0,
    ) -> calibrator_pb2.HeadInfo:
        """Upload references (files or ``(name, bytes)``), follow the fit, return the new head's info."""
        items = [(p.name, p.read_bytes()) if isinstance(p, Path) else p for p in images]

        def run() -> calibrator_pb2.HeadInfo:
            stream = self.stub.FitHead(
                _fit_requests(
                    product, items, backbone=backbone, method=method, activate=activate, options=options or {}
                ),
                timeout=timeout_s,
            )
            result = None
            for msg in stream:
                if progress is not None:
                    progress(msg)
                if msg.HasField("result"):
                    result = msg.result
            if result is None:
                raise CalibratorError(
                    self.address, "FitHead", "CANCELLED", f"the fit of {product} ended without a head"
                )
            return result

        return self._call("FitHead", run)  # type: ignore[return-value]

    def list(self, product: str = "") -> list[calibrator_pb2.HeadInfo]:
        req = calibrator_pb2.ListHeadsRequest(product_id=product)
        return list(self._call("ListHeads", lambda: self.stub.ListHeads(req, timeout=self.timeout_s).heads))

    def get(self, product: str, version: int = 0) -> calibrator_pb2.HeadInfo:
        sel = calibrator_pb2.HeadSelector(product_id=product, version=version)
        return self._call("GetHead", lambda: self.stub.GetHead(sel, timeout=self.timeout_s))  # type: ignore[return-value]

    def download(self, product: str, version: int = 0, *, expected_sha256: str | None = None) -> bytes:
        """The artifact bytes, verified against the sha256 the server sends (and the expected one, if given)."""
        sel = calibrator_pb2.HeadSelector(product_id=product, version=version)

        def run() -> bytes:
            sent_sha, parts = "", []
            for c in self.stub.DownloadHead(sel, timeout=self.timeout_s):
                sent_sha = sent_sha or c.sha256
                parts.append(c.data)
            return sent_sha, b"".join(parts)

        sent_sha, data = self._call("DownloadHead", run)  # type: ignore[misc]
        sha = hashlib.sha256(data).hexdigest()
        for what, want in (("the server's", sent_sha), ("the announced", expected_sha256)):
            if want and sha != want:
                raise CalibratorError(
                    self.address,
                    "DownloadHead",
                    "DATA_LOSS",
                    f"{product} v{version}: sha256 {sha[:12]} != {what} {want[:12]}",
                )
        return data

    def activate(self, product: str, version: int = 0) -> calibrator_pb2.HeadInfo:
        sel = calibrator_pb2.HeadSelector(product_id=product, version=version)
        return self._call("ActivateHead", lambda: self.stub.ActivateHead(sel, timeout=self.timeout_s))  # type: ignore[return-value]

    def rollback(self, product: str) -> calibrator_pb2.HeadInfo:
        sel = calibrator_pb2.HeadSelector(product_id=product)
        return self._call("RollbackHead", lambda: self.stub.RollbackHead(sel, timeout=self.timeout_s))  # type: ignore[return-value]

    def finish_commissioning(self, product: str, timeout_s: float = 1800.0) -> calibrator_pb2.HeadInfo:
        """Ends the active version's commissioning with the frames collected so far; the line version it makes
        (frames read back and embedded, a bank grown) can take minutes on a CPU, hence the fit's own deadline."""
        sel = calibrator_pb2.HeadSelector(product_id=product)
        return self._call("FinishCommissioning", lambda: self.stub.FinishCommissioning(sel, timeout=timeout_s))  # type: ignore[return-value]

    def delete(self, product: str, version: int = 0) -> calibrator_pb2.HeadInfo:
        sel = calibrator_pb2.HeadSelector(product_id=product, version=version)
        return self._call("DeleteHead", lambda: self.stub.DeleteHead(sel, timeout=self.timeout_s))  # type: ignore[return-value]

    def set_thresholds(
        self,
        product: str,
        version: int = 0,
        *,
        image: float | None = None,
        pixel: float | None = None,
        activate: bool = True,
    ) -> calibrator_pb2.HeadInfo:
        req = calibrator_pb2.SetThresholdsRequest(
            head=calibrator_pb2.HeadSelector(product_id=product, version=version), activate=activate
        )
        if image is not None:
            req.image_threshold = image
        if pixel is not None:
            req.pixel_threshold = pixel
        return self._call("SetThresholds", lambda: self.stub.SetThresholds(req, timeout=self.timeout_s))  # type: ignore[return-value]
