"""Train-step memory and time against row length T at equal tokens per step.

Each row holds one shared-prompt unit of about T tokens (a prompt of about T/2 and two
completions of about T/4: long preference pairs), ``rows = tokens / T`` rows per step, so
every T runs the same number of tokens and completion tokens; only how far attention
reaches changes (the span is the unit, about T, so the blocked path's work and memory grow
with T²). Each (attention implementation, T) runs in a fresh subprocess: XLA's compiled
memory of the step (arguments + outputs + temporaries − aliased), peak RSS after compiling
and running ``--steps`` steps, and the median step time (wall and process CPU).

    python -m experiments.bench.seq_sweep                          # blocked and flash, 512..8192
    python -m experiments.bench.seq_sweep --impls flash --lengths 1024 8192 --json out.json
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from experiments.bench import harness

SHAPE = harness.Shape(width=256, layers=4, ffw=768, heads=4, kv_heads=2, vocab=8192, tie=True)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--tokens", type=int, default=8192, help="row tokens per step (rows x T)")
    p.add_argument("--impls", nargs="*", default=["blocked", "flash"])
    p.add_argument("--block", type=int, default=128, help="attention_block")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--live", action="store_true", help="live reference (default: cached)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args, impl: str, t: int) -> dict:
    """Compile and run the step of one (implementation, T) in this process."""
    import jax

    rows = max(1, args.tokens // t)
    cfg = SHAPE.config(t, compute_dtype=args.dtype, attention_block=args.block,
                       attention_impl=impl)  # fmt: skip
    graph, params, n = harness.build_model(cfg)
    half, quarter = t // 2, t // 4
    data = harness.synthetic_pairs(
        rows, (half - 16, half - 8), (quarter - 16, quarter - 8), SHAPE.vocab, t
    )
    todo, span = harness.batches(
        data, "shared_prompt", row_length=t, completion_width=quarter, rows=rows
    )
    batch = todo[0] if args.live else harness.with_cached_reference(todo[0])
    step, state, ref = harness.make_step(graph, params, live=args.live, span=span)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, ref).compile()
    compile_s = time.perf_counter() - t0
    walls, cpus = [], []
    for i in range(args.steps + 1):  # the AOT-compiled step: no compilation in the loop
        w, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch, ref)
        jax.block_until_ready(metrics)
        if i:  # the first call pays one-time costs (allocation, thread pools)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
    tokens = int((batch["segment_ids"] > 0).sum())
    return dict(
        impl=impl, T=t, rows=rows, span=span, tokens=tokens, non_embedding_params=n,
        xla_gib=harness.compiled_gib(compiled), rss_gib=harness.peak_rss_gib(),
        compile_s=compile_s, step_s=statistics.median(walls), cpu_s=statistics.median(cpus),
    )  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| attention | T | rows | span | XLA GiB | peak RSS GiB | step s | CPU s | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['T']} | failed: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['impl']} | {r['T']} | {r['rows']} | {r['span']} | {r['xla_gib']:.2f} | "
            f"{r['rss_gib']:.2f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        print(json.dumps(measure(args, args.child[0], int(args.child[1]))))
        return
    keep = [a for a in argv if a not in ("--json",)]
    if args.json:
        keep = [a for a in keep if a != args.json]
    rows = []
    for impl in args.impls:
        for t in args.lengths:
            cmd = [
                sys.executable,
                "-m",
                "experiments.bench.seq_sweep",
                *keep,
                "--child",
                impl,
                str(t),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                err = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
                rows.append(dict(impl=impl, T=t, error=err[0][:120]))
            else:
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
