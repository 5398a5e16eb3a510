"""Converter throughput and peak memory on a generated published-layout checkpoint (>= 4 GiB).

    python bench/convert_bench.py [--dir /tmp/v4jax-convert-bench] [--experts 64]

`--experts 16` generates a 1.2 GiB checkpoint instead, for a quicker run.

Measured side by side in one run, each with the source files evicted from the page
cache first (posix_fadvise), so every pass reads from disk:
- a plain sequential read of the checkpoint files (the reference speed);
- `convert` dequantised (bf16) and kept quantised, each in a fresh process that
  reports its own peak RSS (VmHWM, which counts mapped file pages too);
- a plain durable write (fsync) of as many bytes as the dequantised output, the
  ceiling a writer of that much data faces on this disk.
- `load_pretrained` of the kept-quantised output, in a fresh process: peak RSS against
  the model's bytes (the CPU device's memory is host memory here).
- each conversion twice: with the input checks of the decode pass (non-finite values) and
  the per-leaf checksums on, as shipped, and with both stubbed out, to show what they cost.
Prints throughput as a fraction of the read, as a fraction of the I/O bound
(read and durable write perfectly overlapped), and peak RSS against the largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tiny.json widened to real widths: 4.06 GiB published, embed 505 MiB, stacked expert leaf 512 MiB.
WIDE = dict(hidden_size=2048, moe_intermediate_size=2048, n_routed_experts=64, num_experts_per_tok=6,
            vocab_size=129280, num_attention_heads=16, head_dim=512, q_lora_rank=1024, o_groups=4,
            o_lora_rank=512, index_n_heads=16)
CHUNK = 64 * 2**20


def evict(files: list[Path]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def sequential_read(files: list[Path]) -> float:
    buf, start = bytearray(CHUNK), time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def durable_write(path: Path, n_bytes: int) -> float:
    buf, start = os.urandom(CHUNK), time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        for _ in range(n_bytes // CHUNK):
            fh.write(buf)
        os.fsync(fh.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def status(field: str) -> int:
    """A /proc/self/status memory figure in bytes. VmHWM is this process's own peak RSS;
    ru_maxrss would also count the parent's, which Linux carries over exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(src: str, dst: str, mode: str) -> None:
    """One conversion (mode "dequantised" / "keep", "+unchecked" to stub out the non-finite checks
    and the checksums) or one `load_pretrained` of the converted folder `src` (mode "load") in
    this fresh process; prints seconds and RSS figures as JSON."""
    import importlib

    import jax
    from flax import nnx

    from v4jax import load_pretrained
    from v4jax.checkpoint import convert, converter

    if mode.endswith("+unchecked"):
        mode = mode.removesuffix("+unchecked")
        # The module itself: `from v4jax.checkpoint import model_layout` is the function of that name.
        importlib.import_module("v4jax.checkpoint.model_layout").check_finite = lambda *args: None
        converter.checksum.start = lambda arrays: {name: [] for name in arrays}

    jax.devices()
    base = status("VmRSS")
    start = time.perf_counter()
    figures = {}
    if mode == "load":
        model = load_pretrained(src)
        figures["model_bytes"] = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    else:
        convert(src, dst, keep_quantized=mode == "keep", progress=False)
    seconds = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread's CPU time: steadier than wall time on a busy host
    print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "base_rss": base,
                      "peak_rss": status("VmHWM"), **figures}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/v4jax-convert-bench"))
    p.add_argument("--experts", type=int, default=64, help="routed experts per layer (sets the size)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)

    import numpy as np

    from v4jax.checkpoint import model_layout, read_published, write_random_checkpoint
    from v4jax.errors import CheckpointError
    from v4jax.config import ModelConfig

    args.dir.mkdir(parents=True, exist_ok=True)
    config = args.dir / "config.json"
    config.write_text(json.dumps({**json.loads((ROOT / "configs" / "tiny.json").read_text()), **WIDE,
                                  "n_routed_experts": args.experts}, indent=2))
    src = args.dir / f"published-{args.experts}"
    try:
        published = read_published(src)
    except CheckpointError:
        shutil.rmtree(src, ignore_errors=True)
        start = time.perf_counter()
        write_random_checkpoint(config, src)
        print(f"generated {src} in {time.perf_counter() - start:.0f} s")
        published = read_published(src)
    files = sorted(src.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    largest = max(loc.spec.nbytes for loc in published.tensors.values())
    cfg = ModelConfig.from_json(config)
    out_bytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in model_layout(cfg, False).values())
    largest_leaf = max(int(np.prod(s.shape)) * s.dtype.itemsize for s in model_layout(cfg, False).values())
    gib = 2**30
    print(f"checkpoint: {total / gib:.2f} GiB in {len(files)} files, {len(published.tensors)} tensors; "
          f"largest tensor {largest / 2**20:.0f} MiB, largest model-layout leaf {largest_leaf / 2**20:.0f} MiB")

    evict(files)
    read_s = sequential_read(files)
    print(f"plain sequential read: {read_s:.1f} s, {total / read_s / 1e9:.2f} GB/s")
    rows = []
    for mode in ("dequantised", "dequantised+unchecked", "keep", "keep+unchecked"):
        dst = args.dir / f"converted-{mode}"
        shutil.rmtree(dst, ignore_errors=True)
        evict(files)
        run = subprocess.run([sys.executable, __file__, "--child", str(src), str(dst), mode],
                             capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        written = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
        if mode == "keep":  # load it back: the model once in memory, not once per layer and once stacked
            run = subprocess.run([sys.executable, __file__, "--child", str(dst), "-", "load"],
                                 capture_output=True, text=True, check=True)
            load = json.loads(run.stdout.strip().splitlines()[-1])
        shutil.rmtree(dst)
        rows.append((mode, result, written))
    write_s = durable_write(args.dir / "write-test", out_bytes)
    print(f"plain durable write of {out_bytes / gib:.1f} GiB (the dequantised output size): {write_s:.1f} s, "
          f"{out_bytes / write_s / 1e9:.2f} GB/s")
    print()
    print(f"{'mode':<22} {'seconds':>8} {'GB/s in':>8} {'vs read':>8} {'written':>9} {'I/O bound':>9} "
          f"{'vs bound':>8} {'peak RSS':>9} {'base RSS':>9} {'peak - largest tensor':>22}")
    for mode, r, written in rows:
        bound = max(read_s, written / out_bytes * write_s)  # read in, durable write out, fully overlapped
        print(f"{mode:<22} {r['seconds']:>8.1f} {total / r['seconds'] / 1e9:>8.2f} {read_s / r['seconds']:>8.3f} "
              f"{written / gib:>7.2f}Gi {bound:>8.1f}s {bound / r['seconds']:>8.3f} {r['peak_rss'] / gib:>7.2f}Gi "
              f"{r['base_rss'] / gib:>7.2f}Gi {(r['peak_rss'] - largest) / gib:>20.2f}Gi")
    print("goals: throughput >= 0.8 of the plain read; peak RSS <= largest tensor + 1 GiB "
          f"(largest model-layout leaf: {largest_leaf / 2**20:.0f} MiB)")
    runs = {mode: r for mode, r, _ in rows}
    for mode in ("dequantised", "keep"):
        on, off = runs[mode], runs[mode + "+unchecked"]
        print(f"checks (non-finite values, per-leaf checksums) in {mode}: {on['seconds']:.1f} s wall / "
              f"{on['cpu_seconds']:.1f} s CPU against {off['seconds']:.1f} s / {off['cpu_seconds']:.1f} s without "
              f"({on['seconds'] / off['seconds'] - 1:+.1%} wall, {on['cpu_seconds'] / off['cpu_seconds'] - 1:+.1%} CPU)")
    above = load["peak_rss"] - load["base_rss"]
    # The ratio alone misleads on a small model: what loading adds beyond the model is about one
    # restored batch (at most the largest leaf) plus allocator slack, whatever the model's size.
    print(f"\nload_pretrained of the kept-quantised folder: {load['seconds']:.1f} s; model "
          f"{load['model_bytes'] / gib:.2f} GiB, peak RSS above base {above / gib:.2f} GiB "
          f"({above / load['model_bytes']:.2f}x the model; model + {(above - load['model_bytes']) / gib:.2f} GiB, "
          f"largest leaf {largest_leaf / gib:.2f} GiB)")


if __name__ == "__main__":
    main()
