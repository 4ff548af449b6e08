"""On-disk cache of backbone tokens, so training and evaluation extract each image once.

One safetensors file per (backbone weights, image size, taps, image bytes); float16
tokens. Nothing here is needed for inference.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scorer.backbones.base import Backbone, BackboneOutput
from scorer.images import load_image


class FeatureCache:
    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        if self.root:
            self.root.mkdir(parents=True, exist_ok=True)

    def _key(self, backbone: Backbone, path: Path, letterbox: bool = False) -> str:
        h = hashlib.sha256()
        h.update(f"{backbone.spec}|{backbone.weights_id}|{backbone.image_size}|{tuple(backbone.taps)}|".encode())
        if backbone.active_precision != "fp32":  # fp32 keys stay as they were: existing caches remain valid
            h.update(f"precision={backbone.active_precision}|".encode())
        if letterbox:
            h.update(b"letterbox|")
        h.update(path.read_bytes())
        return h.hexdigest()

    def embed_paths(
        self,
        backbone: Backbone,
        paths: Sequence[Path],
        *,
        batch_size: int = 8,
        letterbox: bool = False,
        progress: Callable[[int, int], None] = lambda done, total: None,
    ) -> BackboneOutput:
        """Tokens of every file (CPU, float16), from the cache where present.

        ``progress(done, total)`` counts every path: the cached ones at once, then each extracted batch.
        """
        n = len(paths)
        results: list[list[torch.Tensor] | None] = [None] * n
        boxes: list[torch.Tensor | None] = [None] * n
        keys: list[str | None] = [None] * n
        todo: list[int] = []
        for i, p in enumerate(paths):
            if self.root is not None:
                keys[i] = self._key(backbone, Path(p), letterbox)
                f = self.root / f"{keys[i]}.safetensors"
                if f.is_file():
                    try:
                        t = load_file(str(f))
                        results[i] = [t[f"tap.{j}"] for j in range(len(backbone.taps))]
                        boxes[i] = t["content"] if letterbox else None
                        continue
                    except (SafetensorError, OSError, KeyError):
                        f.unlink(missing_ok=True)
            todo.append(i)
        cached = n - len(todo)
        progress(cached, n)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s : s + batch_size]
            out = backbone.embed([load_image(paths[i]) for i in chunk], batch_size=batch_size, letterbox=letterbox)
            for j, i in enumerate(chunk):
                toks = [t[j].half().contiguous() for t in out.tokens]
                results[i] = toks
                boxes[i] = out.content[j].contiguous() if out.content is not None else None
                if self.root is not None:
                    fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
                    os.close(fd)
                    stored = {f"tap.{k}": v for k, v in enumerate(toks)}
                    if boxes[i] is not None:
                        stored["content"] = boxes[i]
                    save_file(stored, tmp)
                    os.replace(tmp, self.root / f"{keys[i]}.safetensors")
            progress(cached + min(s + batch_size, len(todo)), n)
        tokens = [torch.stack([r[j] for r in results if r is not None]) for j in range(len(backbone.taps))]
        content = torch.stack([b for b in boxes if b is not None]) if letterbox else None
        return BackboneOutput(tokens=tokens, grid=backbone.grid, content=content)
