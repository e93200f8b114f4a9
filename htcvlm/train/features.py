"""The frozen parts' outputs cached on disk for stage 2 on Ray Train (`--workers N --feature-cache DIR`).

Stage 2 keeps the MGVQ (and, by default, the vision tower) frozen, so their outputs for an image do not
change during a run. The single process computes them once over its pool, in memory. The Ray path
streams its images, and without a cache it runs both frozen parts on every micro-batch. With one, a Ray
Data pass (`precompute`) computes them for every sample of the source before training and writes them to
disk; each worker's data stage (`stream.SampleRows`) reads its rows' features from there, so the
training workers run only what trains.

Layout of DIR:
- `cache.json`: what the features are of. The frozen weights' hash, the preprocessing, whether the
  tower is frozen, the source's images, and the shard size. A cache made for anything else is refused
  rather than read.
- `{s:06d}.safetensors`: samples [s·SHARD, (s+1)·SHARD) of the source, as float32 arrays "quantized"
  (the MGVQ's) and "patches" (the tower's, when frozen), row i being sample s·SHARD + i, and
  "readable" (1 or 0): whether the image could be read. A LLaVA image that cannot be read has the
  features of the blank image its row gets, and scores nothing; with "readable" the data stage knows
  that without opening the file again (a cache written before it held "readable" has its LLaVA
  images decoded on every read, as without a cache).

A shard is written under a temporary name and renamed, so a killed pass leaves only whole shards, and
the next run computes the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from htcvlm.checkpoint import CONFIG_FILE, find_weights, load_pretrained
from htcvlm.data.dataset import VQASample
from htcvlm.model import HTCVLM
from htcvlm.pool import tensorize

SHARD = 256  # samples a shard file holds
MANIFEST = "cache.json"
CHUNK = 64  # images through the frozen parts at once


@torch.no_grad()
def frozen_inputs(model: HTCVLM, pixels: torch.Tensor, freeze_vision: bool) -> dict[str, torch.Tensor]:
    """The frozen MGVQ's and tower's outputs for (B, 3, S, S) pixels in [0, 1], as `train_vlm`
    precomputes them for its pool: the model's `quantized` and `patches` inputs."""
    inputs = {}
    if model.has_mgvq:
        inputs["quantized"] = model.mgvq.encode(pixels).quantized
    if freeze_vision and model.has_vision:
        inputs["patches"] = model.vision_patches(pixels)
    return inputs


def blank_sample(size: int) -> VQASample:
    """What stands in for an image that could not be read: black, no text."""
    return VQASample(Image.new("RGB", (size, size)), "", "", None, "llava")


def frozen_key(start: Path, freeze_vision: bool) -> dict[str, Any]:
    """The checkpoint's frozen parts as features depend on them: preprocessing, the parts' configs, and a
    SHA-256 over their weights (read from the files, whatever else the checkpoint holds)."""
    config = json.loads((start / CONFIG_FILE).read_text())["htcvlm"]
    prefixes = ("mgvq.", "vision.") if freeze_vision else ("mgvq.",)
    digest = hashlib.sha256()
    for file, names in sorted(find_weights(start).tensors.items()):
        with safe_open(str(start / file), framework="pt") as f:
            for name in sorted(k for k in names if k.startswith(prefixes)):
                tensor = f.get_tensor(name).contiguous()
                digest.update(name.encode())
                digest.update(str(tensor.dtype).encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    kept = {key: config.get(key) for key in ("image_size", "preprocess", "mgvq", "channels")}
    if freeze_vision:
        kept["vision"] = config.get("vision")
    return {"config": kept, "freeze_vision": freeze_vision, "weights_sha256": digest.hexdigest()}


class FeatureCache:
    """The shards of one cache folder: which exist, and the features of given samples."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def shard(self, s: int) -> Path:
        return self.folder / f"{s:06d}.safetensors"

    def missing(self, samples: int) -> list[int]:
        return [s for s in range(-(-samples // SHARD)) if not self.shard(s).is_file()]

    def claim(self, manifest: dict[str, Any]) -> None:
        """Make the folder this manifest's cache, or check that it is: a cache of other features is a
        ValueError naming what differs."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MANIFEST
        if not path.is_file():
            path.write_text(json.dumps(manifest, indent=1))
            return
        held = json.loads(path.read_text())
        if held != manifest:
            differ = sorted(k for k in manifest.keys() | held.keys() if held.get(k) != manifest.get(k))
            raise ValueError(
                f"the feature cache {self.folder} holds other features (its {', '.join(differ)} differ): "
                "remove it or give another --feature-cache folder"
            )

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The cached arrays of these samples, stacked in their order: the features, and "readable"
        where the cache holds it."""
        rows: dict[str, list[np.ndarray]] = {}
        shards, within = np.divmod(indices, SHARD)
        for s in np.unique(shards):
            places = np.flatnonzero(shards == s)
            with safe_open(str(self.shard(int(s))), framework="np") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    column = rows.setdefault(name, [None] * len(indices))  # type: ignore[list-item]
                    for at in places:
                        column[at] = part[int(within[at]) : int(within[at]) + 1]
        return {name: np.concatenate(parts) for name, parts in rows.items()}

    def write(self, s: int, features: dict[str, torch.Tensor]) -> None:
        """Shard s, atomically: a reader sees the whole file or none."""
        tmp = self.shard(s).with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.float().contiguous().cpu() for k, v in features.items()}, str(tmp))
        os.replace(tmp, self.shard(s))


class ComputeShards:
    """Ray Data's map stage of the precomputing pass: {"data": shard numbers} -> the same, each shard's
    features computed by the start checkpoint's frozen parts and written to the cache."""

    def __init__(self, start: str, source: Any, folder: str, freeze_vision: bool, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load_pretrained(start, device="auto")
        self.source, self.cache, self.freeze_vision = source, FeatureCache(folder), freeze_vision

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.model.config.image_size
        for s in map(int, batch["data"]):
            indices = np.arange(s * SHARD, min(len(self.source), (s + 1) * SHARD))
            samples = self.source.samples(indices, size)
            readable = torch.tensor([x is not None for x in samples], dtype=torch.float32)
            # an unreadable image stands in as the data stage makes it (its row scores nothing)
            pixels = tensorize(
                self.model, [x if x is not None else blank_sample(size) for x in samples]
            ).pixels
            parts: dict[str, list[torch.Tensor]] = {}
            for start in range(0, len(pixels), CHUNK):
                chunk = pixels[start : start + CHUNK].float().to(self.model.device) / 255.0
                with worker_autocast(self.model.device):
                    for name, value in frozen_inputs(self.model, chunk, self.freeze_vision).items():
                        parts.setdefault(name, []).append(value)
            features = {name: torch.cat(values) for name, values in parts.items()}
            self.cache.write(s, {**features, "readable": readable})
        return {"data": batch["data"]}


def worker_autocast(device: torch.device) -> torch.autocast:
    """How a Ray Train worker (and this pass, for the same features) runs the model: bf16 autocast on
    GPUs, none on CPUs."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def precompute(
    folder: str | Path, start: Path, source: Any, freeze_vision: bool, actors: int, cpus: float, gpus: float
) -> FeatureCache:
    """The cache at `folder` for this checkpoint's frozen parts and this source: the missing shards
    computed by `actors` Ray Data actors (each `cpus` CPUs and `gpus` GPUs), the rest kept."""
    import ray
    from ray.data import ActorPoolStrategy

    from htcvlm.train.pacing import pace_ray_data

    pace_ray_data()
    cache = FeatureCache(folder)
    cache.claim({"shard": SHARD, "images": source.images_key(), **frozen_key(start, freeze_vision)})
    missing = cache.missing(len(source))
    if missing:
        # one block per shard: the actors take blocks, and one block of every number fed a single actor
        shards = ray.data.from_numpy([np.array([s], dtype=np.int64) for s in missing])
        shards.map_batches(
            ComputeShards,
            fn_constructor_args=(str(start), source, str(cache.folder), freeze_vision, max(1, int(cpus))),
            batch_size=1,
            compute=ActorPoolStrategy(size=min(actors, len(missing))),
            num_cpus=cpus,
            num_gpus=gpus,
        ).materialize()
    return cache
