"""Similarity search over voco latents: exact flat against one IVF configuration, same data, one run.

Synthetic latents: `--n` clustered float32 vectors of `--dim` (default 200,000 x 4096, 3.3 GB, made in
chunks) around `--clusters` random centres, and `--queries` fresh vectors from the same centres. Both
indexes are `cache.index.LatentIndex` (cosine over normalized vectors), so the id mapping is measured
too. Recall@k is against the flat index's exact answers. Prints build time, QPS (one batch of all
queries, and one query at a time as the Search handler issues them), recall@k and bytes per vector
(on disk as saved, and resident memory added while building).

    python bench/bench_search.py [--n 200000] [--dim 4096] [--ivf IVF1024,Flat] [--nprobe 4 16 64] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from cache.index import IndexConfig, LatentIndex
from htcvlm.record import image_id_of

FINGERPRINT = "bench"
CHUNK = 20_000  # vectors generated and added at a time: bounds the temporary copies


@dataclass(frozen=True)
class Built:
    name: str
    build_s: float  # training included
    train_s: float
    disk_bytes_per_vector: float  # index.faiss + ids.npy + manifest, as saved
    rss_bytes_per_vector: float  # resident memory added while building


@dataclass(frozen=True)
class Measured:
    name: str
    batch_qps: float
    single_qps: float
    recall: float


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def clustered(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32: a random centre plus Gaussian noise of `spread` per coordinate."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        out[s : s + m] = centres[rng.integers(len(centres), size=m)]
        out[s : s + m] += spread * rng.standard_normal((m, centres.shape[1]), dtype=np.float32)
    return out


def build(
    name: str, config: IndexConfig, data: np.ndarray, image_ids: list[str], train_n: int
) -> tuple[LatentIndex, Built]:
    rss0 = rss_bytes()
    index = LatentIndex(FINGERPRINT, config)
    t0 = time.perf_counter()
    if not index.is_trained:
        sample = np.random.default_rng(1).choice(len(data), size=min(train_n, len(data)), replace=False)
        index.train(data[np.sort(sample)])
    train_s = time.perf_counter() - t0
    for s in range(0, len(data), CHUNK):
        index.add(image_ids[s : s + CHUNK], data[s : s + CHUNK])
    build_s = time.perf_counter() - t0
    rss = rss_bytes() - rss0
    with tempfile.TemporaryDirectory() as tmp:
        index.save(tmp)
        disk = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return index, Built(name, build_s, train_s, disk / len(data), rss / len(data))


def measure(
    name: str, index: LatentIndex, queries: np.ndarray, k: int, truth: list[list[str]] | None, n_single: int
) -> tuple[Measured, list[list[str]]]:
    t0 = time.perf_counter()
    hits = index.search(queries, k)  # (n_queries, k)
    batch_qps = len(queries) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for q in queries[:n_single]:
        index.search(q, k)
    single_qps = n_single / (time.perf_counter() - t0)
    found = [[h.image_id for h in row] for row in hits]
    if truth is None:
        return Measured(name, batch_qps, single_qps, 1.0), found
    overlap = [len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]
    return Measured(name, batch_qps, single_qps, float(np.mean(overlap))), found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument(
        "--clusters", type=int, default=50, help="fewer clusters than IVF lists: a cluster spans many lists"
    )
    parser.add_argument(
        "--spread", type=float, default=1.0, help="noise std per coordinate (centres have std 1)"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ivf", default="IVF1024,Flat")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--train", type=int, default=50_000, help="training sample for IVF")
    parser.add_argument("--quick", action="store_true", help="20,000 vectors, IVF128, 200 queries")
    args = parser.parse_args()
    if args.quick:
        args.n, args.clusters, args.queries, args.single, args.train = 20_000, 10, 200, 50, 10_000
        args.ivf = "IVF128,Flat"

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    data = clustered(args.n, centres, args.spread, rng)
    queries = clustered(args.queries, centres, args.spread, rng)
    image_ids = [image_id_of(i.to_bytes(8, "little")) for i in range(args.n)]
    print(
        f"{args.n} x {args.dim} float32 ({data.nbytes / 2**30:.2f} GiB) in {args.clusters} clusters, "
        f"{args.queries} queries, k={args.k}; generated in {time.perf_counter() - t0:.1f} s; "
        f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {faiss.get_num_gpus()} GPUs\n"
    )

    flat, flat_built = build("Flat (exact)", IndexConfig(dim=args.dim), data, image_ids, args.train)
    flat_m, truth = measure(flat_built.name, flat, queries, args.k, None, args.single)
    del flat
    gc.collect()
    ivf_config = IndexConfig(dim=args.dim, spec=args.ivf, nprobe=args.nprobe[0])
    ivf, ivf_built = build(args.ivf, ivf_config, data, image_ids, args.train)
    ivf_ms = []
    for nprobe in args.nprobe:
        ivf.set_nprobe(nprobe)
        ivf_ms.append(measure(f"{args.ivf} nprobe={nprobe}", ivf, queries, args.k, truth, args.single)[0])

    line = "{:22} {:>9} {:>9} {:>11} {:>10}"
    print(line.format("index", "build s", "train s", "disk B/vec", "RSS B/vec"))
    for b in (flat_built, ivf_built):
        print(
            line.format(
                b.name,
                f"{b.build_s:.1f}",
                f"{b.train_s:.1f}",
                f"{b.disk_bytes_per_vector:.0f}",
                f"{b.rss_bytes_per_vector:.0f}",
            )
        )
    print(f"(raw vector {4 * args.dim} B)\n")
    line = "{:26} {:>10} {:>11} {:>10}   {}"
    print(
        line.format(
            "search", "batch QPS", "single QPS", f"recall@{args.k}", "ratios to Flat: batch QPS, single QPS"
        )
    )
    for m in (flat_m, *ivf_ms):
        ratios = f"x{m.batch_qps / flat_m.batch_qps:.1f}, x{m.single_qps / flat_m.single_qps:.1f}"
        print(line.format(m.name, f"{m.batch_qps:.0f}", f"{m.single_qps:.1f}", f"{m.recall:.4f}", ratios))
    print(f"\nIVF build time / Flat build time: x{ivf_built.build_s / flat_built.build_s:.1f}")


if __name__ == "__main__":
    main()
