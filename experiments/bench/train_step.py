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
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

MODES = (
    "padded-live",
    "padded-cached",
    "pairs-live",
    "pairs-cached",
    "shared-live",
    "shared-cached",
)
GIB = 2.0**30


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


def matmul_peak(n: int = 2048, repeats: int = 7) -> tuple[float, float]:
    """(wall, cpu) f32 GFLOP/s of a jitted n×n matmul: the machine's practical peak."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        f(a, a).block_until_ready()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    flops = 2.0 * n**3
    return flops / statistics.median(walls) / 1e9, flops / statistics.median(cpus) / 1e9


def synthetic_pairs(args):
    """A tokenised shard of random pairs (prompt + two completions, EOS-free ids)."""
    from mipo_jax.data.encoding import Tokenized
    from mipo_jax.data.ragged import Ragged
    from mipo_jax.data.report import Report

    rng = np.random.default_rng(0)
    n = args.pairs
    plen = rng.integers(args.prompt[0], args.prompt[1] + 1, n)
    clen = rng.integers(args.completion[0], args.completion[1] + 1, (n, 2))
    room = args.seq - 1 - plen  # shared-prompt rows hold prompt + both completions + 1
    clen = np.minimum(clen, np.maximum(room // 2, 1)[:, None])
    tok = lambda k: rng.integers(3, args.vocab, k).tolist()
    return Tokenized(
        prompt=Ragged.from_lists([tok(k) for k in plen]),
        completions=tuple(Ragged.from_lists([tok(k) for k in clen[:, s]]) for s in range(2)),
        example_id=np.arange(n, dtype=np.int64),
        ref_logps=None,
        label=None,
        pad_id=0,
        report=Report("synthetic", "error"),
    )


def batches(args, layout: str):
    """Every batch of one epoch over the pairs, in ``layout`` (fixed shapes)."""
    from mipo_jax.data import packing
    from mipo_jax.data.iterator import PreferenceIterator
    from mipo_jax.data.packing import Layout

    data = synthetic_pairs(args)
    width = -(-args.completion[1] // 8) * 8
    if layout == "padded":
        lay = Layout(
            kind="padded", batch_size=args.per_step, row_length=args.seq, completion_width=width
        )
    else:
        kind = "pairs" if layout == "pairs" else "shared_prompt"
        lay = Layout(kind=kind, rows=args.rows, row_length=args.packed_row, completion_width=width)
    it = PreferenceIterator(data, lay, seed=0, num_epochs=1, drop_remainder=False,
                            process_index=0, process_count=1)  # fmt: skip
    out = []
    for b in it:
        b.pop("example_id", None)
        b.pop("ref_logps", None)
        out.append(b)
    span = None
    if layout != "padded" and not args.no_span:  # the longest unit a row packs
        span = int(packing.unit_lengths(data, lay.kind).max())
    return out, span


def work_flops(args, batch: dict, live: bool) -> float:
    """Attention (visible query-key pairs) and vocabulary-projection FLOPs of one step."""
    from mipo_jax.data.batch import attention_mask

    pairs_visible = float(np.asarray(attention_mask(batch)).sum())
    attn = 4 * args.width * args.layers * pairs_visible * (3 + live)
    completion = float(np.asarray(batch["mask"]).sum())
    head = 2 * args.width * args.vocab * completion * (4 + live)
    return attn + head


def non_embedding_params(params) -> int:
    import jax

    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "embed" not in name and "lm_head" not in name:
            total += int(np.prod(x.shape))
    return total


def build_mode(args, mode: str, params, graph, n_params: int) -> dict:
    """Compiled step, its batches and static counts for one mode."""
    import functools

    import jax
    import ml_collections as mlc

    from mipo_jax.losses import loss_config
    from mipo_jax.train import optim
    from mipo_jax.train import state as st
    from mipo_jax.train import step as sp

    layout, ref = mode.split("-")
    todo, span = batches(args, layout)
    loss = mlc.FrozenConfigDict(loss_config("reference"))
    opt = mlc.ConfigDict(
        dict(name="adamw", learning_rate=1e-5, warmup_steps=0, schedule="constant")
    )
    tx, lr = optim.make_optimizer(opt, 100)
    live = ref == "live"
    spec = sp.StepSpec(
        graphs=(("policy", graph),), ref_graph=graph if live else None, loss=loss, tx=tx, lr=lr,
        fields=frozenset({"reference"}), chunk_size=256, attention_span=span,
    )  # fmt: skip
    if not live:
        for b in todo:  # cached log-probs (their values do not change the timing)
            b["ref_logps"] = np.zeros(b["targets"].shape, np.float32)
    state = st.init_state({"policy": jax.tree.map(lambda x: x.copy(), params)}, tx, 0)
    ref_params = params if live else None
    step = jax.jit(functools.partial(sp.train_step, spec=spec), donate_argnums=0)
    compiled = step.lower(state, todo[0], ref_params).compile()
    mem = compiled.memory_analysis()
    xla = None
    if mem is not None:
        xla = (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        ) / GIB  # fmt: skip
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
    import jax
    from flax import nnx

    from mipo_jax.models import CausalLM, ModelConfig
    from mipo_jax.sharding import make_mesh
    from mipo_jax.train import state as st

    cfg = ModelConfig(
        family="llama", vocab_size=args.vocab, hidden_size=args.width,
        intermediate_size=args.ffw, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.heads, head_dim=args.width // args.heads,
        max_position_embeddings=max(args.seq, args.packed_row), tie_embeddings=False,
        compute_dtype=args.dtype, attention_block=args.block,
    )  # fmt: skip
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graph, params, _ = st.create_params(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    return graph, params, non_embedding_params(params)


def run_interleaved(args) -> list[dict]:
    """All modes in one process, their steps alternating, so shared cores hit all alike."""
    import jax

    graph, params, n = model(args)
    modes = [build_mode(args, mode, params, graph, n) for mode in args.modes]
    peaks = [matmul_peak()]
    for i in range(max(m["steps"] for m in modes)):
        for m in modes:
            if i >= m["steps"]:
                continue
            t, c = time.perf_counter(), time.process_time()
            m["state"], out = m["step"](m["state"], m["batches"][i], m["ref"])
            jax.block_until_ready(out)
            m["wall"] += time.perf_counter() - t
            m["cpu"] += time.process_time() - c
        peaks.append(matmul_peak())
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
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec (the forking parent's size).
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


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
        peaks.append(matmul_peak()[0])
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
