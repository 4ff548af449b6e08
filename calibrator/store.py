"""Versioned head store on disk: ``<root>/<product>/v<N>.safetensors`` plus ``state.json``.

Writes are atomic (temporary file, fsync, rename), so the store survives restarts
and a crash never leaves a half-written artifact or state. A write that fails (a full
disk) raises :class:`StoreWriteError` and leaves the store as it was. ``state.json``
holds the active version and the activation history (for rollback).
"""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

from inspection_core.errors import HeadError, InspectionError
from inspection_core.ids import check_product_id, head_id
from inspection_pb.v1 import common_pb2
from scorer.artifact import atomic_write_bytes, file_sha256, head_to_bytes, read_manifest
from scorer.head import Head


class StoreError(InspectionError):
    """A product or version is not in the store, or the store is inconsistent."""


class StoreWriteError(InspectionError):
    """The store's disk refused a write (full, read-only, ...); nothing of the change was kept."""

    def __init__(self, message: str, *, errno_: int | None, path: Path) -> None:
        super().__init__(message)
        self.errno = errno_
        self.path = path

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


def manifest_ref(product: str, manifest: dict) -> common_pb2.HeadRef:
    """The HeadRef of a stored version (``HeadStore.info``), as results and announcements name it."""
    v = manifest["version"]
    return common_pb2.HeadRef(product_id=product, head_id=head_id(product, v), version=v, sha256=manifest["sha256"])


class HeadStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, product: str) -> threading.Lock:
        """One lock per product: changes of one product (new versions, activation) run one at a time."""
        with self._guard:
            return self._locks.setdefault(product, threading.Lock())

    # -- state ------------------------------------------------------------------
    def _dir(self, product: str) -> Path:
        return self.root / check_product_id(product)

    def _state(self, product: str) -> dict:
        p = self._dir(product) / "state.json"
        if not p.exists():
            return {"active": None, "history": []}
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{p}: unreadable store state ({exc})") from None

    def _write(self, path: Path, data: bytes, what: str) -> None:
        """Atomic write; an OSError becomes a StoreWriteError naming ``what`` failed and the file."""
        created = not path.parent.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
        except OSError as exc:
            if created:  # a new product's folder, empty again: would be listed as a product without heads
                try:
                    path.parent.rmdir()
                except OSError:
                    pass
            reason = exc.strerror or str(exc)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                reason += " (the head store's disk is full)"
            raise StoreWriteError(
                f"{what}: writing {path} failed: {reason}; the store is unchanged", errno_=exc.errno, path=path
            ) from None

    def _save_state(self, product: str, state: dict, what: str) -> None:
        self._write(self._dir(product) / "state.json", json.dumps(state, indent=2).encode(), what)

    def products(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, product: str) -> list[int]:
        d = self._dir(product)
        if not d.is_dir():
            return []
        return sorted(int(p.stem[1:]) for p in d.glob("v*.safetensors") if p.stem[1:].isdigit())

    def active(self, product: str) -> int | None:
        return self._state(product)["active"]

    def path(self, product: str, version: int = 0) -> Path:
        """Artifact path; version 0 means the active one."""
        v = version or self.active(product)
        if not v:
            raise StoreError(f"product {product!r} has no active head")
        p = self._dir(product) / f"v{v}.safetensors"
        if not p.is_file():
            raise StoreError(f"product {product!r} has no head version {v}")
        return p

    # -- changes ------------------------------------------------------------------
    def add(self, product: str, head: Head, *, activate: bool = False) -> int:
        """Store ``head`` as the next version (and activate it); on a failed write neither is kept."""
        d = self._dir(product)
        version = max(self.versions(product), default=0) + 1
        head.meta.update({"product": product, "version": version})
        path = d / f"v{version}.safetensors"
        data = head_to_bytes(head, product=product, version=version)
        self._write(path, data, f"{product}: storing version {version}")
        if activate:
            try:
                self.activate(product, version)
            except BaseException:
                path.unlink(missing_ok=True)  # all or nothing: an inactive leftover would look like a stored fit
                raise
        return version

    def activate(self, product: str, version: int) -> int:
        self.path(product, version)  # exists
        state = self._state(product)
        if state["active"] != version:
            if state["active"]:
                state["history"].append(state["active"])
            state["active"] = version
            self._save_state(product, state, f"{product}: activating version {version}")
        return version

    def rollback(self, product: str) -> int:
        state = self._state(product)
        while state["history"]:
            prev = state["history"].pop()
            if (self._dir(product) / f"v{prev}.safetensors").is_file():
                state["active"] = prev
                self._save_state(product, state, f"{product}: rolling back to version {prev}")
                return prev
        raise StoreError(f"product {product!r} has no earlier active version to roll back to")

    def delete(self, product: str, version: int) -> None:
        p = self.path(product, version)
        state = self._state(product)
        if state["active"] == version:
            state["active"] = None
        state["history"] = [v for v in state["history"] if v != version]
        self._save_state(product, state, f"{product}: deleting version {version}")
        try:
            p.unlink()
        except OSError as exc:
            raise StoreWriteError(
                f"{product}: deleting version {version}: removing {p} failed: {exc.strerror or exc}",
                errno_=exc.errno,
                path=p,
            ) from None

    def info(self, product: str, version: int = 0) -> dict:
        p = self.path(product, version)
        try:
            m = read_manifest(p)
        except HeadError as exc:
            raise StoreError(str(exc)) from None
        m["sha256"] = file_sha256(p)
        m["active"] = self.active(product) == m.get("version")
        return m
