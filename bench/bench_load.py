"""Saving and loading a 7B-geometry checkpoint: built on the meta device and loaded with assign=True in
the stored dtype, against the naive build (`HTCVLM(config)` in fp32, random init, then load_state_dict).

The bench writes random bf16 weights once per geometry (sharded at 5 GB, like transformers), then loads
them, each case in a fresh subprocess that reports its wall time and peak resident memory (ru_maxrss):
the time load_pretrained takes to return, and the time until every weight is resident (the bench touches
every page: a loader that maps the files would return early and read on first use).
The naive fp32 build of the full 7B model needs ~30 GB and is only run on a geometry that fits this
machine (the paper preset with fewer LLM layers); the full paper geometry is loaded with meta + assign
only. Files go to a temporary folder under --dir and are removed at the end.

    python bench/bench_load.py [--dir /work] [--layers 8] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

VOCAB = 32000  # LLaMA's vocabulary, so the embedding and output rows are the 7B model's


def _tokenizer(vocab_size: int):  # a transformers tokenizer
    """A byte-level tokenizer of exactly `vocab_size` tokens (bytes, specials, filler tokens): the bench
    needs the vocabulary's size, not a trained one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from htcvlm.tokenizer import BOS, EOS, PAD

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [PAD, BOS, EOS, *alphabet]
    tokens += [f"<filler_{i}>" for i in range(vocab_size - len(tokens))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def _config(layers: int):  # an HTCConfig
    from htcvlm.config import HTCConfig

    paper = HTCConfig.from_name("paper")
    return paper.with_(name=f"paper-{layers}L", llm=replace(paper.llm, num_layers=layers, vocab_size=VOCAB))


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def child_write(folder: Path, layers: int) -> dict[str, float]:
    """Random bf16 weights of the geometry, written sharded: built on meta, allocated once in bf16."""
    import torch

    from htcvlm.checkpoint import save_pretrained
    from htcvlm.model import HTCVLM

    start = time.perf_counter()
    with torch.device("meta"):
        model = HTCVLM(_config(layers), _tokenizer(VOCAB)).to(torch.bfloat16)
    # allocated once, in bf16 (the non-persistent buffers are never saved: their values do not matter here)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    filled = time.perf_counter()
    model.fingerprint()  # the one-time hash that save_pretrained stamps beside the weights
    hashed = time.perf_counter()
    save_pretrained(model, folder)
    done = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "fill_s": filled - start,
        "hash_s": hashed - filled,
        "write_s": done - hashed,
        "peak_gib": _peak_gib(),
    }


def child_load(folder: Path, method: str) -> dict[str, float]:
    from safetensors.torch import load_file

    from htcvlm.checkpoint import describe, load_pretrained
    from htcvlm.model import HTCVLM
    from htcvlm.shards import find_weights

    start = time.perf_counter()
    if method == "naive":  # the pre-7B path: an fp32 model randomly initialised, then the weights copied in
        summary = describe(folder)
        model = HTCVLM(summary.model.config, summary.model.tokenizer)
        for file in find_weights(folder).tensors:
            model.load_state_dict(load_file(str(folder / file)), strict=False)
        model.eval()  # its fingerprint, hashed from fp32 weights, is not asked for: not charged to it
    else:
        if method == "meta-unstamped":
            (folder / "fingerprint.json").unlink(missing_ok=True)
        model = load_pretrained(folder)  # the fingerprint included: stamped, or hashed
    loaded = time.perf_counter()
    # A loader that maps the files returns before reading them: one value read in every 4 KiB page makes
    # every weight resident, as serving would, so the two methods are compared at the same point.
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()
    ready = time.perf_counter()
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    return {
        "load_s": loaded - start,
        "ready_s": ready - start,
        "peak_gib": _peak_gib(),
        "dtype": "/".join(dtypes),
    }


def run_child(*args: str) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode:
        raise SystemExit(f"case {args} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--dir", default="/work", help="where the temporary checkpoints go (~21 GB)")
    parser.add_argument("--layers", type=int, default=8, help="LLM layers of the geometry both methods load")
    parser.add_argument("--skip-full", action="store_true", help="leave out the full 32-layer geometry")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, folder, what = args.child
        result = child_write(Path(folder), int(what)) if kind == "write" else child_load(Path(folder), what)
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-load-", dir=args.dir))
    print(f"load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cpus; files under {tmp}")
    try:
        geometries = [args.layers] + ([] if args.skip_full else [32])
        for layers in geometries:
            folder = tmp / f"paper-{layers}L"
            w = run_child("write", str(folder), str(layers))
            shards = len(list(folder.glob("model-*-of-*.safetensors"))) or 1
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**30
            print(
                f"\npaper geometry, {layers} LLM layers: {w['params'] / 1e9:.2f} B parameters, bf16, "
                f"{size:.1f} GiB in {shards} shards"
            )
            print(
                f"  write: fill {w['fill_s']:.1f} s, one-time sha256 {w['hash_s']:.1f} s "
                f"({size / w['hash_s']:.2f} GiB/s), save {w['write_s']:.1f} s, peak {w['peak_gib']:.1f} GiB"
            )
            methods = ["meta", "meta-unstamped", "meta"] + (["naive"] if layers == args.layers else [])
            results = {}
            print(f"  {'load':<36}{'returns s':>10}{'resident s':>11}{'peak GiB':>10}  dtype")
            for method in methods:
                r = run_child("load", str(folder), method)
                label = {
                    "meta": "meta + assign, stamped fingerprint",
                    "meta-unstamped": "meta + assign, fingerprint hashed",
                    "naive": "naive fp32 build + load_state_dict",
                }[method]
                times = f"{r['load_s']:>10.1f}{r['ready_s']:>11.1f}"
                print(f"  {label:<36}{times}{r['peak_gib']:>10.1f}  {r['dtype']}")
                results[method] = r  # the second stamped run (warm page cache) is the one compared
            if "naive" in results:
                naive, meta = results["naive"], results["meta"]
                print(
                    f"  naive / meta+assign: {naive['ready_s'] / meta['ready_s']:.1f}x the time to resident "
                    "weights, "
                    f"{naive['peak_gib'] / meta['peak_gib']:.1f}x the peak host memory"
                )
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
