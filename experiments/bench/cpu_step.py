"""The CPU train step against the model trunk's own forward + backward, in the same run.

Setup (the issue's TRL comparison): a 7.1M-parameter Llama (width 256, 4 layers, MLP 688,
4 heads of 64, vocabulary 7680 untied; N = 3.16M non-embedding), 8 pairs of 128 prompt +
128 completion tokens (the padded pair layout, T = 256, no padding), sigmoid DPO with a
live reference, AdamW, float32. For each model variant (attention implementation, MLP
implementation, scan or unrolled layers) it times, interleaved round by round:

* ``trunk``: the gradient of Σ hidden·r over the step's 16 rows (the policy's forward and
  backward only: 6·N FLOPs per token);
* ``step``: the jitted DPO step (policy forward + backward, reference forward, the chunked
  log-prob head of both, the loss and AdamW: 8·N model FLOPs per token);
* ``head``: the chunked log-prob head alone (forward + backward of the policy's, forward
  of the reference's) over the 2 × 8 × 128 completion tokens;
* ``adamw``: the optimiser update alone.

The rates are model FLOPs / process CPU seconds (and per wall second); ``step ÷ trunk`` is
the step's rate over the trunk's (the issue's target: ≥ 85 %).

    python -m experiments.bench.cpu_step
    python -m experiments.bench.cpu_step --variants blocked,autodiff,scan flash,custom_vjp,unroll
"""

import argparse
import json
import statistics
import time

from experiments.bench import harness

SHAPE = harness.Shape(width=256, layers=4, ffw=688, heads=4, vocab=7680, tie=False)
DEFAULT_VARIANTS = [
    "blocked,autodiff,scan",
    "blocked,autodiff,unroll",
    "flash,autodiff,scan",
    "flash,custom_vjp,scan",
    "flash,custom_vjp,unroll",
]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                   help="attention,mlp,scan|unroll")  # fmt: skip
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--completion", type=int, default=128)
    p.add_argument("--block", type=int, default=128, help="attention_block")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="also write the rows here")
    return p.parse_args(argv)


def _variant(args, name: str, batch, span):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mipo_jax.losses.logps import chunked_token_logps

    attn, mlp, layers = name.split(",")
    cfg = SHAPE.config(
        args.prompt + args.completion, compute_dtype=args.dtype, attention_block=args.block,
        attention_impl=attn, mlp_impl=mlp, scan_layers=layers == "scan",
    )  # fmt: skip
    graph, params, n = harness.build_model(cfg)
    step, state, ref = harness.make_step(graph, params, live=True, span=span)
    rows = lambda x: x.reshape(-1, x.shape[-1])
    tokens, pos, seg = (rows(batch[k]) for k in ("tokens", "positions", "segment_ids"))
    r = jax.random.normal(jax.random.key(0), (*tokens.shape, SHAPE.width), jnp.float32)

    def trunk(p):
        h = nnx.merge(graph, p).hidden(tokens, pos, seg)
        return jnp.sum(h.astype(jnp.float32) * r)

    c = args.completion
    h_c = jax.random.normal(jax.random.key(1), (args.pairs, 2, c, SHAPE.width), cfg.compute_dtype)
    w = params["lm_head"]["kernel"].astype(cfg.compute_dtype)
    targets = jnp.asarray(batch["targets"]).reshape(args.pairs, 2, -1)[..., :c]

    def head(h, w):  # the policy's log-probs with gradient, the reference's without
        lp = chunked_token_logps(h, w, targets)
        ref_lp = jax.lax.stop_gradient(chunked_token_logps(h * 0.5, w, targets))
        return jnp.sum(lp - ref_lp)

    tx = optax.adamw(1e-5)
    opt = tx.init(params)

    def adamw(p, g, o):
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    fns = dict(
        step=(step.lower(state, batch, ref).compile(), [state, batch, ref]),
        trunk=(jax.jit(jax.grad(trunk)).lower(params).compile(), [params]),
        head=(jax.jit(jax.grad(head, argnums=(0, 1))).lower(h_c, w).compile(), [h_c, w]),
        adamw=(jax.jit(adamw, donate_argnums=(0, 2)).lower(params, params, opt).compile(),
               [jax.tree.map(jnp.copy, params), params, opt]),
    )  # fmt: skip
    return dict(name=name, n=n, fns=fns, wall={k: [] for k in fns}, cpu={k: [] for k in fns})


def _call(v, key):
    import jax

    fn, a = v["fns"][key]
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a)
    jax.block_until_ready(out)
    v["wall"][key].append(time.perf_counter() - t)
    v["cpu"][key].append(time.process_time() - c)
    if key == "step":
        a[0] = out[0]  # the donated state
    elif key == "adamw":
        a[0], a[2] = out


def run(args) -> list[dict]:
    data = harness.synthetic_pairs(
        args.pairs, (args.prompt,) * 2, (args.completion,) * 2, SHAPE.vocab,
        2 * (args.prompt + args.completion),
    )  # fmt: skip
    todo, _ = harness.batches(
        data, "padded", row_length=args.prompt + args.completion,
        completion_width=args.completion, per_step=args.pairs,
    )  # fmt: skip
    batch = todo[0]
    variants = [_variant(args, name, batch, None) for name in args.variants]
    for v in variants:  # warm-up
        for key in v["fns"]:
            _call(v, key)
            v["wall"][key].clear()
            v["cpu"][key].clear()
    for _ in range(args.rounds):
        for v in variants:
            for key in v["fns"]:
                _call(v, key)
    tokens = int((batch["segment_ids"] > 0).sum())
    out = []
    for v in variants:
        med = {k: statistics.median(x) for k, x in v["cpu"].items()}
        wall = {k: statistics.median(x) for k, x in v["wall"].items()}
        trunk_rate = 6 * v["n"] * tokens / med["trunk"] / 1e9
        step_rate = 8 * v["n"] * tokens / med["step"] / 1e9
        out.append(
            dict(
                variant=v["name"], non_embedding_params=v["n"], tokens=tokens,
                cpu_s=med, wall_s=wall, trunk_gflops_cpu=trunk_rate, step_gflops_cpu=step_rate,
                step_over_trunk=step_rate / trunk_rate,
                step_over_trunk_wall=(8 / wall["step"]) / (6 / wall["trunk"]),
            )
        )  # fmt: skip
    return out


def table(rows) -> str:
    lines = [
        f"N = {rows[0]['non_embedding_params'] / 1e6:.2f}M non-embedding, {rows[0]['tokens']} "
        "tokens per step; medians of process CPU seconds (wall in brackets)",
        "",
        "| variant | step s | trunk s | head s | adamw s | trunk GFLOP/CPU-s | step GFLOP/CPU-s "
        "| step ÷ trunk (CPU) | (wall) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, w = r["cpu_s"], r["wall_s"]
        cell = lambda k, c=c, w=w: f"{c[k]:.3f} ({w[k]:.3f})"
        lines.append(
            f"| {r['variant']} | {cell('step')} | {cell('trunk')} | {cell('head')} | "
            f"{cell('adamw')} | {r['trunk_gflops_cpu']:.1f} | {r['step_gflops_cpu']:.1f} | "
            f"{r['step_over_trunk']:.0%} | {r['step_over_trunk_wall']:.0%} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    rows = run(args)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
