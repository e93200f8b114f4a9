"""Large-index search at 4096 dims: IVF-PQ with exact re-ranking, against exact search, one run.

Synthetic latents: `--n` clustered float32 vectors of `--dim` around `--clusters` random centres,
L2-normalized (cosine = inner product, as `cache.index` stores them), written in chunks to a memmap under
`--dir` (n x dim x 4 bytes: 16 GB at 1 M x 4096) and streamed from it into each index, never all in memory.
`--queries` fresh vectors from the same centres. Exact top-k by a chunked scan of the memmap is the
reference. For each factory string: train on `--train` sampled rows, add in chunks (build time), then per
nprobe: recall@k of the index alone and after exactly re-ranking its top `k * --rerank` candidates with
their stored vectors (read back from the memmap, as the service would read stored latents), single-query
QPS (re-ranking included), and bytes per vector of the serialized index; last, the peak resident memory.

Memory: the memmap lives in the page cache, which the kernel reclaims, though the memmap pages the process
has touched count in its peak resident size (18.9 GiB at 1 M x 4096). What it needs to hold is the
training sample (`--train` x dim x 4 bytes) and about as much again for the residuals PQ is trained on,
the index (codes, ids, nlist x dim x 4 bytes of centroids) and one chunk being made or added (50,000 x dim
x 4 bytes, a few times over). Measured at 4096 dims: 3.4 GiB peak with `--train 20000` (the chunks
dominate); `--train 100000` adds ~5 GB, well inside 24 GiB.
Time: IVF training is k-means, `--kmeans-iter` x train x nlist x dim multiply-adds (faiss's default is 25
iterations; 10 do for coarse lists, which re-ranking with nprobe 16 barely depends on), then every added
vector is assigned to a list (n x nlist x dim). The million-vector IVF4096 run in 24 GiB on 2 cores,
~15 min on an idle machine (5 to train, 6 to add, the rest making and scanning 16 GB):

    python bench/bench_ivfpq.py --n 1000000 --dir /work --train 100000 --kmeans-iter 10 \\
        --specs IVF4096,PQ64 --nprobe 16 --rerank 50
    python bench/bench_ivfpq.py --n 200000                  # a fifth of it, as in docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

CHUNK = 50_000


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_latents(path: Path, n: int, centres: np.ndarray, rng: np.random.Generator) -> np.memmap:
    """(n, dim) float32 on disk: a random centre plus Gaussian noise, normalized, chunk by chunk."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, centres.shape[1]))
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        picks = rng.integers(0, len(centres), m)
        out[s : s + m] = normalized(centres[picks] + rng.standard_normal((m, centres.shape[1]), np.float32))
    out.flush()
    return out


def exact_top_k(latents: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) ids of the exact top-k by inner product, by one scan over the rows in chunks."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for s in range(0, len(latents), CHUNK):
        scores = queries @ np.asarray(latents[s : s + CHUNK]).T  # (q, chunk)
        ids = np.arange(s, s + scores.shape[1])[None].repeat(len(queries), 0)
        all_s, all_i = np.concatenate([best_s, scores], 1), np.concatenate([best_i, ids], 1)
        top = np.argpartition(-all_s, k, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def recall(found: list[np.ndarray], truth: np.ndarray, k: int) -> float:
    return float(
        np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)])
    )


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--train", type=int, default=50_000)
    parser.add_argument("--specs", nargs="+", default=["IVF1024,PQ64", "IVF1024,PQ128"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rerank", type=int, default=10, help="candidates re-ranked: k times this")
    parser.add_argument(
        "--kmeans-iter",
        type=int,
        default=25,
        help="k-means iterations training the IVF lists (faiss's default)",
    )
    parser.add_argument("--dir", default=None, help="where the memmap of latents goes (default: a temp dir)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim), np.float32) * 2.0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        started = time.perf_counter()
        latents = write_latents(Path(tmp) / "latents.npy", args.n, centres, rng)
        picks = rng.integers(0, args.clusters, args.queries)
        queries = normalized(centres[picks] + rng.standard_normal((args.queries, args.dim), np.float32))
        made = time.perf_counter() - started
        started = time.perf_counter()
        truth = exact_top_k(latents, queries, args.k)
        scan = time.perf_counter() - started
        gib = args.n * args.dim * 4 / 2**30
        threads = faiss.omp_get_max_threads()
        print(
            f"{args.n:,} x {args.dim} float32 ({gib:.1f} GiB on disk, made in {made:.0f} s), {args.queries} "
            f"queries, k={args.k}; faiss {faiss.__version__}, {threads} threads, {os.cpu_count()} CPUs; "
            f"exact scan of all queries {scan:.1f} s"
        )
        head = f"{'index':<16}{'nprobe':>7}{'recall':>8}{'+rerank':>9}"
        print(f"{head}{'QPS':>8}{'B/vec':>8}{'build s':>9}{'train s':>9}")
        sample = np.sort(rng.choice(args.n, min(args.train, args.n), replace=False))
        for spec in args.specs:
            index = faiss.index_factory(args.dim, spec, faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(index).cp.niter = args.kmeans_iter
            started = time.perf_counter()
            index.train(np.asarray(latents[sample]))
            trained = time.perf_counter() - started
            for s in range(0, args.n, CHUNK):
                index.add(np.asarray(latents[s : s + CHUNK]))
            built = time.perf_counter() - started
            per_vector = len(faiss.serialize_index(index)) / args.n
            ivf = faiss.extract_index_ivf(index)
            for nprobe in args.nprobe:
                ivf.nprobe = nprobe
                raw, reranked = [], []
                started = time.perf_counter()
                for q in queries:
                    _, ids = index.search(q[None], args.k * args.rerank)
                    candidates = ids[0][ids[0] >= 0]
                    raw.append(candidates)
                    exact = np.asarray(latents[np.sort(candidates)]) @ q  # stored vectors, exact scores
                    reranked.append(np.sort(candidates)[np.argsort(-exact)])
                qps = len(queries) / (time.perf_counter() - started)
                found = f"{recall(raw, truth, args.k):>8.3f}{recall(reranked, truth, args.k):>9.3f}"
                print(
                    f"{spec:<16}{nprobe:>7}{found}{qps:>8.0f}{per_vector:>8.0f}{built:>9.0f}{trained:>9.0f}"
                )
            del index
        print(f"(a float32 vector is {args.dim * 4:,} B; re-ranking reads k x {args.rerank} stored vectors)")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"peak resident memory {peak:.1f} GiB (memmap pages it touched included: reclaimable)")


if __name__ == "__main__":
    main()
