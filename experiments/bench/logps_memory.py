"""Peak memory and time of per-token log-probs, forward + backward: chunked against naive.

The job is ``value_and_grad`` of ``sum(token log-probs)`` w.r.t. the final hidden states
``h`` [B, T, D] and the unembedding ``w`` [D, V], with the per-token log-probs as an
auxiliary output. ``naive`` forms ``logits = h @ w`` [B, T, V] and calls
``mipo_jax.losses.logps.token_logps``; ``chunked-C`` calls ``chunked_token_logps`` with
``chunk_size=C``; ``remat-C`` is the simple alternative (``lax.scan`` over chunks of a
``jax.checkpoint``-ed naive step, gradients by autodiff), for comparison only.

Every variant runs in a fresh subprocess so that peak RSS (``ru_maxrss``) is its own. Each
reports XLA's compiled memory analysis (arguments + outputs + temporaries − aliased), the
median (and min) wall time and the median process CPU time of ``--repeats`` calls after
``--warmup`` calls, and saves its outputs so that the parent can check them against naive.
CPU time is the fairer measure when other work shares the machine's cores.

Run from the repository root (the numbers in experiments/bench/README.md):

    .venv/bin/python -m experiments.bench.logps_memory --seq 8192 --chunks 512 1024
    .venv/bin/python -m experiments.bench.logps_memory --find-max-seq   # compile-only sweep
    .venv/bin/python -m experiments.bench.logps_memory --seq 4096 --interleave  # fair timing
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

GIB = 2.0**30


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936, help="V (default: Qwen's 151,936)")
    p.add_argument("--width", type=int, default=896, help="D (default: Qwen2.5-0.5B's 896)")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--seq", type=int, default=8192, help="T")
    p.add_argument("--chunks", type=int, nargs="*", default=[512, 1024], help="chunk sizes C")
    p.add_argument("--remat", type=int, nargs="*", default=[], help="chunk sizes for remat-C")
    p.add_argument("--no-naive", action="store_true", help="skip naive (e.g. T too large)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls (after the warm-ups)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    p.add_argument("--rtol", type=float, default=1e-5, help="tolerance of the result check")
    p.add_argument(
        "--find-max-seq",
        action="store_true",
        help="print naive's compiled peak for a range of T (no run) and exit",
    )
    p.add_argument("--budget-gib", type=float, default=22.0, help="memory naive may use")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="time only: one process, variants' calls alternated (fair under shared cores)",
    )
    p.add_argument("--json", help="also write the table's rows to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- the jobs


def _job(variant: str):
    """(h, w, y) -> ((sum logps, logps), (dh, dw)) for one variant name."""
    import jax
    import jax.numpy as jnp

    from mipo_jax.losses import logps as L

    if variant == "naive":
        logps = lambda h, w, y: L.token_logps(h @ w, y)
    elif variant.startswith("chunked-"):
        c = int(variant.split("-")[1])
        logps = lambda h, w, y: L.chunked_token_logps(h, w, y, chunk_size=c)
    elif variant.startswith("remat-"):
        logps = _remat_logps(int(variant.split("-")[1]))
    else:
        raise ValueError(variant)

    def total(h, w, y):
        lp = logps(h, w, y)
        return jnp.sum(lp), lp

    return jax.value_and_grad(total, argnums=(0, 1), has_aux=True)


def _remat_logps(chunk: int):
    """lax.scan over token chunks of a rematerialised naive step; T must divide by chunk."""
    import jax
    import jax.numpy as jnp

    from mipo_jax.losses import logps as L

    def logps(h, w, y):
        b, t, d = h.shape
        hc = jnp.moveaxis(h.reshape(b, t // chunk, chunk, d), 1, 0)
        yc = jnp.moveaxis(y.reshape(b, t // chunk, chunk), 1, 0)
        step = jax.checkpoint(lambda hy: L.token_logps(hy[0] @ w, hy[1]))
        out = jax.lax.map(step, (hc, yc))
        return jnp.moveaxis(out, 0, 1).reshape(b, t)

    return logps


def _inputs(args):
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(args.dtype)
    b, t, d, v = args.batch, args.seq, args.width, args.vocab

    @jax.jit
    def make(key):
        k1, k2, k3 = jax.random.split(key, 3)
        h = jax.random.normal(k1, (b, t, d), jnp.float32)
        # logits of standard deviation ~3, like a trained LM head's spread
        w = jax.random.normal(k2, (d, v), jnp.float32) * (3.0 / d**0.5)
        y = jax.random.randint(k3, (b, t), 0, v)
        return h.astype(dt), w.astype(dt), y

    return make(jax.random.key(0))


def _shapes(args):
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(args.dtype)
    return (
        jax.ShapeDtypeStruct((args.batch, args.seq, args.width), dt),
        jax.ShapeDtypeStruct((args.width, args.vocab), dt),
        jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32),
    )


def _compiled_peak(compiled) -> dict:
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return {"xla_peak_gib": peak / GIB, "xla_temp_gib": m.temp_size_in_bytes / GIB}


def _child(args) -> None:
    """Run one variant in this (fresh) process; print one JSON line; save the outputs."""
    import jax

    compiled = jax.jit(_job(args.child)).lower(*_shapes(args)).compile()
    row = {"variant": args.child, **_compiled_peak(compiled)}
    h, w, y = _inputs(args)
    jax.block_until_ready((h, w, y))
    times, cpus = [], []
    for _ in range(args.warmup + args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(compiled(h, w, y))
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    row["time_s"] = statistics.median(times[args.warmup :])
    row["min_s"] = min(times[args.warmup :])
    row["cpu_s"] = statistics.median(cpus[args.warmup :])
    row["times_s"] = [round(x, 3) for x in times]
    row["cpus_s"] = [round(x, 3) for x in cpus]
    row["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    (_, lp), (dh, dw) = out
    for name, x in (("logps", lp), ("dh", dh), ("dw", dw)):
        np.save(os.path.join(args.out_dir, f"{args.child}.{name}.npy"), np.asarray(x, np.float32))
    print("ROW " + json.dumps(row), flush=True)


def _run_child(variant: str, argv: list[str], out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench.logps_memory", *argv]
    cmd += ["--child", variant, "--out-dir", out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"variant": variant, "error": f"exit {proc.returncode}: {tail.strip()[-300:]}"}
    return json.loads(rows[0])


# ----------------------------------------------------------------------------- checks


def _compare(variant: str, out_dir: str, rtol: float) -> dict:
    """Max |x − naive| / max |naive| per output, and elementwise allclose at rtol."""
    res, ok = {}, True
    for name in ("logps", "dh", "dw"):
        a = np.load(os.path.join(out_dir, f"{variant}.{name}.npy"))
        b = np.load(os.path.join(out_dir, f"naive.{name}.npy"))
        scale = float(np.max(np.abs(b))) or 1.0
        res[f"err_{name}"] = float(np.max(np.abs(a - b))) / scale
        ok &= bool(np.allclose(a, b, rtol=rtol, atol=rtol * scale))
    res["same"] = ok
    return res


def _find_max_seq(args) -> None:
    """Naive's compiled peak for growing T; the largest under the budget is the one to run."""
    import jax

    print(f"naive, B={args.batch}, D={args.width}, V={args.vocab}, {args.dtype}")
    print(f"{'T':>7} {'XLA peak GiB':>13} {'temp GiB':>9}")
    for t in range(1024, 32769, 1024):
        args.seq = t
        c = jax.jit(_job("naive")).lower(*_shapes(args)).compile()
        p = _compiled_peak(c)
        print(f"{t:7d} {p['xla_peak_gib']:13.2f} {p['xla_temp_gib']:9.2f}", flush=True)
        if p["xla_peak_gib"] > args.budget_gib:
            break


def _interleaved(args, variants: list[str]) -> None:
    """Wall and CPU time with the variants' calls alternated in one process (no memory)."""
    import jax

    h, w, y = _inputs(args)
    fns = {v: jax.jit(_job(v)).lower(h, w, y).compile() for v in variants}
    wall = {v: [] for v in variants}
    cpu = {v: [] for v in variants}
    for i in range(args.warmup + args.repeats):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fns[v](h, w, y))
            if i >= args.warmup:
                wall[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        print(f"  round {i}: load {os.getloadavg()[0]:.1f}", flush=True)
    base = variants[0]
    print(f"\n| {'variant':<13} | median s | min s | time × | CPU s | CPU × |")
    print("|---------------|----------|-------|--------|-------|-------|")
    for v in variants:
        mw, mc = statistics.median(wall[v]), statistics.median(cpu[v])
        tw, tc = mw / statistics.median(wall[base]), mc / statistics.median(cpu[base])
        print(f"| {v:<13} | {mw:8.2f} | {min(wall[v]):5.1f} | {tw:6.2f} | {mc:5.1f} | {tc:5.2f} |")


def _table(rows: list[dict]) -> str:
    head = (
        f"| {'variant':<13} | {'XLA peak GiB':>12} | {'peak RSS GiB':>12} | {'mem ÷':>6} "
        f"| {'median s':>8} | {'min s':>7} | {'time ×':>6} | {'CPU s':>7} | {'CPU ×':>5} "
        f"| {'rel err logps / dh / dw':>27} | same |"
    )
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    base = next((r for r in rows if r["variant"] == "naive" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']:<13} | failed: {r['error']} |")
            continue
        ratio_m = base["rss_gib"] / r["rss_gib"] if base else float("nan")
        ratio_t = r["time_s"] / base["time_s"] if base else float("nan")
        ratio_c = r["cpu_s"] / base["cpu_s"] if base else float("nan")
        errs = " / ".join(
            f"{r.get(k, float('nan')):.1e}" for k in ("err_logps", "err_dh", "err_dw")
        )
        lines.append(
            f"| {r['variant']:<13} | {r['xla_peak_gib']:12.2f} | {r['rss_gib']:12.2f} "
            f"| {ratio_m:6.1f} | {r['time_s']:8.2f} | {r['min_s']:7.2f} | {ratio_t:6.2f} "
            f"| {r['cpu_s']:7.1f} | {ratio_c:5.2f} "
            f"| {errs:>27} "
            f"| {'yes' if r.get('same', True) else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        return _child(args)
    if args.find_max_seq:
        return _find_max_seq(args)
    variants = ([] if args.no_naive else ["naive"]) + [f"chunked-{c}" for c in args.chunks]
    variants += [f"remat-{c}" for c in args.remat]
    b, t, d, v = args.batch, args.seq, args.width, args.vocab
    print(f"B={b} T={t} D={d} V={v} {args.dtype}; value_and_grad of sum(logps) w.r.t. h, w")
    if args.interleave:
        print(f"{args.repeats} rounds after {args.warmup} warm-up round(s), calls alternated")
        return _interleaved(args, variants)
    print(f"{args.repeats} timed calls after {args.warmup} warm-up(s); a fresh process per variant")
    print(f"load average before: {os.getloadavg()}\n", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for var in variants:
            row = _run_child(var, argv, out_dir)
            if "error" not in row and var != "naive" and not args.no_naive:
                row.update(_compare(var, out_dir, args.rtol))
            rows.append(row)
            print(f"  done {var}: {json.dumps(row)}", flush=True)
            for f in os.listdir(out_dir):  # keep only naive's outputs between variants
                if not f.startswith("naive."):
                    os.remove(os.path.join(out_dir, f))
    print(f"\nload average after: {os.getloadavg()}")
    print("mem ÷ = naive's peak RSS / this one's; time × = this median / naive's median;")
    print("CPU s = median process CPU time (user+sys, all threads) per call; CPU × likewise\n")
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
