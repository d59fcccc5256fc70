"""Train-step throughput and MFU on this CPU: live vs cached reference, padded vs packed.

A Llama-family model (default: D = 768, 4 layers, F = 2048, 6 heads of 128, V = 8192,
untied; N = 28.3M non-embedding parameters) runs the real jitted DPO train step
(`mipo_jax.train.step`: policy forward + backward through the chunked log-prob path, AdamW
update, and a live reference forward or cached reference log-probs) over the same synthetic
preference pairs in three batch layouts of `mipo_jax.data` (padded pair axis at T = 512,
pair packing and shared-prompt packing into rows of 1024 tokens, 2 rows per step):

* model FLOPs per step = (6·N + 2·N if the reference is live) × real (non-pad) tokens of the
  rows; padding is not useful work. Attention score FLOPs and the vocabulary projection are
  not counted (the usual 6·N convention; N excludes embeddings).
* MFU = model FLOP rate / the f32 matmul peak measured in the same process (median of
  2048² matmuls between the steps: the machine's practical peak).
* "+attn+head" adds the useful work the 6·N convention leaves out: attention (QKᵀ and PV,
  4·D FLOPs per visible query-key pair and layer, ×3 forward + backward, ×1 more for a live
  reference) over the pairs the mask allows, and the vocabulary projection at completion
  tokens (2·D·V per token: ×4 for the policy, whose chunked backward recomputes the logits,
  ×1 for a live reference). Its utilisation shows how much of the gap is uncounted work.
* Packed modes pass the longest packed unit as the attention span, so the blocked attention
  (`ModelConfig.attention_block`) skips key blocks no query can see.
* pairs/s = real pairs / time; tokens/s = real row tokens / time.
* memory: peak RSS of the process (each mode runs in its own subprocess) and XLA's
  compiled memory (arguments + outputs + temporaries − aliased) of the step.

The modes run in one process with their steps interleaved (step i of every mode, then step
i + 1, with a matmul-peak measurement after each round), so other work on shared cores hits
all of them alike. Both wall time and process CPU time are reported; on a shared machine
the rate per CPU-second is the fairer one. Peak RSS comes from one fresh subprocess per mode
(compile and one step).

    .venv/bin/python -m experiments.bench.train_step                      # all six modes
    .venv/bin/python -m experiments.bench.train_step --modes padded-live shared-cached
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from experiments.bench import harness

MODES = (
    "padded-live",
    "padded-cached",
    "pairs-live",
    "pairs-cached",
    "shared-live",
    "shared-cached",
)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffw", type=int, default=2048)
    p.add_argument("--heads", type=int, default=6, help="head_dim = width / heads")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512, help="T: padded row length (pair axis)")
    p.add_argument("--packed-row", type=int, default=1024, help="row length of packed layouts")
    p.add_argument("--pairs", type=int, default=16, help="pairs timed per mode (one epoch)")
    p.add_argument("--per-step", type=int, default=4, help="padded: pairs per step")
    p.add_argument("--rows", type=int, default=2, help="packed: rows per step")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode RSS children")
    p.add_argument("--prompt", type=int, nargs=2, default=[100, 220], help="prompt length range")
    p.add_argument("--completion", type=int, nargs=2, default=[40, 140], help="completion range")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--block", type=int, default=128, help="attention_block (0 = one block)")
    p.add_argument("--attention", default="blocked", help="attention_impl (blocked, flash, ...)")
    p.add_argument("--unroll", action="store_true", help="a Python loop over layers, no scan")
    p.add_argument("--no-span", action="store_true", help="packed: no attention span")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument(
        "--trunk", type=int, nargs=2, metavar=("ROWS", "T"),
        help="instead: time only the model trunk, grad of sum(hidden**2) over ROWS x T "
        "unpadded random tokens (no head, loss or optimiser), and print its MFU",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def batches(args, layout: str):
    """Every batch of one epoch over the pairs, in ``layout`` (fixed shapes), and the span."""
    data = harness.synthetic_pairs(args.pairs, args.prompt, args.completion, args.vocab, args.seq)
    row = args.seq if layout == "padded" else args.packed_row
    layout = {"pairs": "pairs", "shared": "shared_prompt"}.get(layout, layout)
    return harness.batches(
        data, layout, row_length=row, completion_width=args.completion[1],
        per_step=args.per_step, rows=args.rows, span=not args.no_span,
    )  # fmt: skip


def work_flops(args, batch: dict, live: bool) -> float:
    """Attention (visible query-key pairs) and vocabulary-projection FLOPs of one step."""
    from mipo_jax.data.batch import attention_mask

    pairs_visible = float(np.asarray(attention_mask(batch)).sum())
    attn = 4 * args.width * args.layers * pairs_visible * (3 + live)
    completion = float(np.asarray(batch["mask"]).sum())
    head = 2 * args.width * args.vocab * completion * (4 + live)
    return attn + head


def build_mode(args, mode: str, params, graph, n_params: int) -> dict:
    """Compiled step, its batches and static counts for one mode."""
    import jax

    layout, ref = mode.split("-")
    todo, span = batches(args, layout)
    live = ref == "live"
    if not live:
        todo = [harness.with_cached_reference(b) for b in todo]
    step, state, ref_params = harness.make_step(graph, params, live=live, span=span)
    compiled = step.lower(state, todo[0], ref_params).compile()
    xla = harness.compiled_gib(compiled)
    for _ in range(2):  # warm-up; the second call compiles again for the donated outputs
        state, m = step(state, todo[0], ref_params)
        jax.block_until_ready(m)
    tokens = sum(int((b["segment_ids"] > 0).sum()) for b in todo)
    return dict(
        mode=mode, step=step, state=state, ref=ref_params, batches=todo, live=live,
        steps=len(todo), pairs=sum(int(b["pair_valid"].sum()) for b in todo), tokens=tokens,
        row_tokens=sum(int(b["segment_ids"].size) for b in todo), xla_gib=xla,
        flops=(6 + (2 if live else 0)) * n_params * tokens, wall=0.0, cpu=0.0, span=span,
        work=sum(work_flops(args, b, live) for b in todo),
    )  # fmt: skip


def model(args):
    shape = harness.Shape(args.width, args.layers, args.ffw, args.heads, vocab=args.vocab)
    cfg = shape.config(
        max(args.seq, args.packed_row), compute_dtype=args.dtype, attention_block=args.block,
        attention_impl=args.attention, scan_layers=not args.unroll,
    )  # fmt: skip
    return harness.build_model(cfg)


def run_interleaved(args) -> list[dict]:
    """All modes in one process, their steps alternating, so shared cores hit all alike."""
    import jax

    graph, params, n = model(args)
    modes = [build_mode(args, mode, params, graph, n) for mode in args.modes]
    peaks = [harness.matmul_peak()]
    for i in range(max(m["steps"] for m in modes)):
        for m in modes:
            if i >= m["steps"]:
                continue
            t, c = time.perf_counter(), time.process_time()
            m["state"], out = m["step"](m["state"], m["batches"][i], m["ref"])
            jax.block_until_ready(out)
            m["wall"] += time.perf_counter() - t
            m["cpu"] += time.process_time() - c
        peaks.append(harness.matmul_peak())
    peak_wall = statistics.median(p[0] for p in peaks)
    peak_cpu = statistics.median(p[1] for p in peaks)
    rows = []
    for m in modes:
        f, wall, cpu = m["flops"], m["wall"], m["cpu"]
        rows.append(
            dict(
                mode=m["mode"], non_embedding_params=n, steps=m["steps"], pairs=m["pairs"],
                tokens=m["tokens"], row_tokens=m["row_tokens"],
                non_pad=m["tokens"] / m["row_tokens"], wall_s=wall, cpu_s=cpu,
                pairs_per_s=m["pairs"] / wall, tokens_per_s=m["tokens"] / wall,
                cpu_s_per_pair=cpu / m["pairs"], gflops_wall=f / wall / 1e9,
                gflops_per_cpu_s=f / cpu / 1e9, peak_wall=peak_wall, peak_per_cpu_s=peak_cpu,
                mfu_wall=f / wall / 1e9 / peak_wall, mfu_cpu=f / cpu / 1e9 / peak_cpu,
                xla_gib=m["xla_gib"], span=m["span"],
                hfu_cpu=(f + m["work"]) / cpu / 1e9 / peak_cpu,
            )
        )  # fmt: skip
    return rows


def peak_rss(args, mode: str) -> float:
    """Peak RSS (GiB) of a fresh process that compiles and runs one step of ``mode``."""
    graph, params, n = model(args)
    build_mode(args, mode, params, graph, n)
    return harness.peak_rss_gib()


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["mode"] == "padded-live"), None)
    head = (
        "| mode | steps | pairs/s | tokens/s | non-pad | GFLOP/s | MFU (wall) | MFU (CPU) | "
        "+attn+head (CPU) | × padded-live (wall) | × padded-live (CPU) | peak RSS GiB | "
        "XLA GiB | span |"
    )
    peak = rows[0]
    lines = [
        f"N = {peak['non_embedding_params'] / 1e6:.1f}M non-embedding parameters; matmul peak "
        f"{peak['peak_wall']:.1f} GFLOP/s (wall), {peak['peak_per_cpu_s']:.1f} GFLOP/CPU-second",
        "",
        head,
        "|" + "---|" * 14,
    ]
    for r in rows:
        speed = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}" if base else "n/a"
        speed_cpu = f"{base['cpu_s_per_pair'] / r['cpu_s_per_pair']:.2f}" if base else "n/a"
        xla = "n/a" if r["xla_gib"] is None else f"{r['xla_gib']:.2f}"
        rss = "n/a" if r.get("rss_gib") is None else f"{r['rss_gib']:.2f}"
        lines.append(
            f"| {r['mode']} | {r['steps']} | {r['pairs_per_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['non_pad']:.2f} | {r['gflops_wall']:.1f} | {r['mfu_wall']:.0%} | "
            f"{r['mfu_cpu']:.0%} | {r['hfu_cpu']:.0%} | {speed} | {speed_cpu} | {rss} | {xla} | "
            f"{r['span'] or '-'} |"
        )
    return "\n".join(lines)


def _passthrough(argv: list[str]) -> list[str]:
    """The parent's size arguments, without --json/--modes (and their values)."""
    out, skip = [], False
    for a in argv:
        if a in ("--json", "--modes"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def trunk_only(args) -> None:
    """MFU of the model alone: forward + backward of the trunk on full rows (6·N per token)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graph, params, n = model(args)
    rows, t = args.trunk
    tokens = jax.random.randint(jax.random.key(1), (rows, t), 0, args.vocab)

    def loss(p):
        h = nnx.merge(graph, p).hidden(tokens)
        return jnp.sum(h * h)

    grad = jax.jit(jax.grad(loss))
    jax.block_until_ready(grad(params))
    walls, peaks = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params))
        walls.append(time.perf_counter() - t0)
        peaks.append(harness.matmul_peak()[0])
    rate = 6 * n * rows * t / min(walls) / 1e9
    peak = statistics.median(peaks)
    print(
        f"trunk {rows}x{t}: N = {n / 1e6:.1f}M, {min(walls):.2f} s, {rate:.1f} GFLOP/s, "
        f"matmul peak {peak:.1f} GFLOP/s, MFU {rate / peak:.0%}"
    )


def main(argv=None):
    args = _parse(argv)
    if args.trunk:
        trunk_only(args)
        return
    if args.child:
        print(json.dumps({"rss_gib": peak_rss(args, args.child)}))
        return
    rows = run_interleaved(args)
    for row in rows:
        row["rss_gib"] = None
        if args.no_memory:
            continue
        cmd = [sys.executable, "-m", "experiments.bench.train_step", "--child", row["mode"]]
        out = subprocess.run(cmd + _passthrough(argv if argv is not None else sys.argv[1:]),
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode == 0:
            row["rss_gib"] = json.loads(out.stdout.strip().splitlines()[-1])["rss_gib"]
        else:
            print(f"{row['mode']}: memory child failed\n{out.stderr[-2000:]}", file=sys.stderr)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
