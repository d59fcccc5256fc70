"""DPO train step of a Llama-3.2-1B-shaped model on an accelerator: MFU, tokens/s, memory.

The model has Llama 3.2 1B's shape (vocabulary 128,256, width 2048, 16 layers, MLP 8192, 32
query and 8 key/value heads of 64, tied embeddings, RoPE θ = 500,000 with "llama3" scaling)
and random weights; parameters are float32, compute bfloat16, attention `attention_impl`
(default ``auto``: cuDNN on CUDA GPUs where the rows allow it, splash on TPUs, the pure-JAX
flash attention otherwise). One jitted DPO step (`harness.make_step`: policy forward +
backward through the chunked log-prob head, AdamW) runs with a live reference (its forward
too) and with cached reference log-probs, on synthetic pairs.

* model FLOPs per step = (6·N, + 2·N with a live reference) × real (non-pad) tokens, N the
  non-embedding parameters (attention scores and the vocabulary head not counted);
* MFU = that rate / the bfloat16 matmul rate of the same device, measured in the same run
  (median of ``--peak-n``² matmuls);
* peak device memory: the device's ``peak_bytes_in_use`` (GPU, TPU), else the process's
  peak RSS (CPU).

    python -m experiments.bench.accelerator                    # the 1B shape (needs a GPU/TPU)
    python -m experiments.bench.accelerator --tiny             # seconds on a CPU (the tests)
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

from experiments.bench import harness
from mipo_jax.models.config import RopeScaling

LLAMA_3_2_1B = harness.Shape(
    width=2048, layers=16, ffw=8192, heads=32, kv_heads=8, vocab=128256, tie=True,
    rope_theta=500000.0,
)  # fmt: skip
TINY = harness.Shape(width=64, layers=2, ffw=128, heads=4, kv_heads=2, vocab=512, tie=True)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model, short rows")
    p.add_argument("--layout", default="padded", choices=["padded", "pairs", "shared_prompt"])
    p.add_argument("--pairs", type=int, default=16, help="pairs per step")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (±12 %%)")
    p.add_argument("--completion", type=int, default=512, help="completion tokens (±12 %%)")
    p.add_argument("--attention", default="auto", help="attention_impl")
    p.add_argument("--block", type=int, default=512, help="attention_block")
    p.add_argument("--remat", default="none", help="remat policy per layer")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    p.add_argument("--peak-n", type=int, default=8192, help="matmul size of the peak")
    p.add_argument("--modes", nargs="*", default=["live", "cached"])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompt, args.completion, args.pairs, args.peak_n = 24, 24, 4, 256
        args.block = min(args.block, 32)
    return args


def _rows(args, shape):
    """(batch, attention span) of one step: ``args.pairs`` synthetic pairs in the layout."""
    lo = lambda x: max(1, int(x * 0.88))
    hi = lambda x: max(1, int(x * 1.12))
    row = hi(args.prompt) + 2 * hi(args.completion) + 8 if args.layout != "padded" else None
    row = row or hi(args.prompt) + hi(args.completion) + 8
    row = -(-row // 128) * 128  # lengths that suit the kernels' blocks
    data = harness.synthetic_pairs(
        args.pairs, (lo(args.prompt), hi(args.prompt)), (lo(args.completion), hi(args.completion)),
        shape.vocab, row if args.layout != "padded" else 2 * row,
    )  # fmt: skip
    todo, span = harness.batches(
        data, args.layout, row_length=row, completion_width=hi(args.completion),
        per_step=args.pairs, rows=args.pairs if args.layout == "pairs" else max(1, args.pairs // 2),
    )  # fmt: skip
    return todo[0], span, row


def device_peak_memory_gib() -> float | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / harness.GIB


def run(args) -> list[dict]:
    import jax

    shape = TINY if args.tiny else LLAMA_3_2_1B
    batch, span, row = _rows(args, shape)
    cfg = shape.config(
        row, compute_dtype="bfloat16", attention_impl=args.attention, attention_block=args.block,
        remat=args.remat,
    )  # fmt: skip
    if not args.tiny:  # Llama 3.2's RoPE scaling
        cfg = dataclasses.replace(cfg, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    graph, params, n = harness.build_model(cfg)
    peak = statistics.median(
        harness.matmul_peak(args.peak_n, repeats=5, dtype="bfloat16")[0] for _ in range(3)
    )
    tokens = int((batch["segment_ids"] > 0).sum())
    out = []
    for mode in args.modes:
        live = mode == "live"
        b = batch if live else harness.with_cached_reference(batch)
        step, state, ref = harness.make_step(graph, params, live=live, span=span)
        t0 = time.perf_counter()
        compiled = step.lower(state, b, ref).compile()
        compile_s = time.perf_counter() - t0
        state, m = compiled(state, b, ref)  # warm-up
        jax.block_until_ready(m)
        walls = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = compiled(state, b, ref)
            jax.block_until_ready(m)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        flops = (6 + 2 * live) * n * tokens
        mem = device_peak_memory_gib()
        out.append(
            dict(
                mode=mode, device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                non_embedding_params=n, layout=args.layout, row_length=row, span=span,
                rows=int(batch["segment_ids"].shape[0] * batch["segment_ids"].shape[1]),
                tokens=tokens, step_s=wall, tokens_per_s=tokens / wall,
                tflops=flops / wall / 1e12, peak_tflops=peak / 1e3, mfu=flops / wall / 1e9 / peak,
                peak_memory_gib=mem if mem is not None else harness.peak_rss_gib(),
                memory_kind="device" if mem is not None else "host RSS",
                xla_gib=harness.compiled_gib(compiled), compile_s=compile_s,
                loss=float(m["loss"].value),
            )
        )  # fmt: skip
    return out


def table(rows: list[dict]) -> str:
    r0 = rows[0]
    head = (
        f"{r0['device']} ({r0['backend']}); N = {r0['non_embedding_params'] / 1e6:.1f}M "
        f"non-embedding; bf16 matmul peak {r0['peak_tflops']:.1f} TFLOP/s; "
        f"{r0['tokens']} real tokens per step ({r0['layout']}, rows of {r0['row_length']})"
    )
    lines = [
        head, "",
        "| reference | step s | tokens/s | TFLOP/s | MFU | peak memory GiB | XLA GiB | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['tflops']:.2f} | "
            f"{r['mfu']:.1%} | {r['peak_memory_gib']:.2f} ({r['memory_kind']}) | "
            f"{r['xla_gib']:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
