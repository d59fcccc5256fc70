"""Pieces the benchmarks share: the model, synthetic pairs and batches, THE train step,
matmul peaks and memory readings.

`make_step` is the one place the benchmarks build `mipo_jax`'s DPO train step; adapt it (and
nothing else here) when `mipo_jax.train.step` changes.
"""

import dataclasses
import functools
import statistics
import time

import numpy as np

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-family model; ``head_dim = width / heads``."""

    width: int = 768
    layers: int = 4
    ffw: int = 2048
    heads: int = 6
    kv_heads: int | None = None  # None = heads
    vocab: int = 8192
    tie: bool = False
    rope_theta: float = 10000.0

    def config(self, max_len: int, **policy):
        from mipo_jax.models import ModelConfig

        return ModelConfig(
            family="llama", vocab_size=self.vocab, hidden_size=self.width,
            intermediate_size=self.ffw, num_layers=self.layers, num_heads=self.heads,
            num_kv_heads=self.kv_heads or self.heads, head_dim=self.width // self.heads,
            max_position_embeddings=max_len, tie_embeddings=self.tie,
            rope_theta=self.rope_theta, **policy,
        )  # fmt: skip


def build_model(cfg, mesh=None):
    """(graph, params, non-embedding parameter count) of a random `CausalLM`."""
    import jax
    from flax import nnx

    from mipo_jax.models import CausalLM
    from mipo_jax.sharding import make_mesh
    from mipo_jax.train import state as st

    mesh = mesh or make_mesh((1, 1, 1), devices=jax.devices()[:1])
    graph, params, _ = st.create_params(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    return graph, params, non_embedding_params(params)


def non_embedding_params(params) -> int:
    import jax

    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if "embed" not in name and "lm_head" not in name:
            total += int(np.prod(x.shape))
    return total


def synthetic_pairs(n, prompt, completion, vocab, row_length, seed=0):
    """A tokenised shard of ``n`` random pairs: prompt and completion lengths drawn from the
    inclusive ranges; completions shortened so prompt + both + 1 fit ``row_length``."""
    from mipo_jax.data.encoding import Tokenized
    from mipo_jax.data.ragged import Ragged
    from mipo_jax.data.report import Report

    rng = np.random.default_rng(seed)
    plen = rng.integers(prompt[0], prompt[1] + 1, n)
    clen = rng.integers(completion[0], completion[1] + 1, (n, 2))
    room = row_length - 1 - plen
    clen = np.minimum(clen, np.maximum(room // 2, 1)[:, None])
    tok = lambda k: rng.integers(3, vocab, k).tolist()
    return Tokenized(
        prompt=Ragged.from_lists([tok(k) for k in plen]),
        completions=tuple(Ragged.from_lists([tok(k) for k in clen[:, s]]) for s in range(2)),
        example_id=np.arange(n, dtype=np.int64),
        ref_logps=None,
        label=None,
        pad_id=0,
        report=Report("synthetic", "error"),
    )


def batches(data, layout: str, *, row_length, completion_width, per_step=4, rows=2, span=True):
    """(every batch of one epoch in ``layout``: padded | pairs | shared_prompt, attention
    span of the packed layouts or None)."""
    from mipo_jax.data import packing
    from mipo_jax.data.iterator import PreferenceIterator
    from mipo_jax.data.packing import Layout

    width = -(-completion_width // 8) * 8
    if layout == "padded":
        lay = Layout(
            kind="padded", batch_size=per_step, row_length=row_length, completion_width=width
        )
    else:
        lay = Layout(kind=layout, rows=rows, row_length=row_length, completion_width=width)
    it = PreferenceIterator(data, lay, seed=0, num_epochs=1, drop_remainder=False,
                            process_index=0, process_count=1)  # fmt: skip
    out = []
    for b in it:
        b.pop("example_id", None)
        b.pop("ref_logps", None)
        out.append(b)
    bound = None
    if layout != "padded" and span:  # the longest unit a row packs
        bound = int(packing.unit_lengths(data, lay.kind).max())
    return out, bound


def make_step(graph, params, *, live: bool, span, chunk_size=256, lr=1e-5, total_steps=100):
    """(jitted DPO train step with the state donated, initial state, reference params or
    None): sigmoid DPO (``loss_config("reference")``), AdamW at a constant ``lr``; the
    reference is live (a frozen copy of ``params``) or cached (``batch["ref_logps"]``)."""
    import jax
    import ml_collections as mlc

    from mipo_jax.losses import loss_config
    from mipo_jax.train import optim
    from mipo_jax.train import state as st
    from mipo_jax.train import step as sp

    loss = mlc.FrozenConfigDict(loss_config("reference"))
    opt = mlc.ConfigDict(dict(name="adamw", learning_rate=lr, warmup_steps=0, schedule="constant"))
    tx, lr_fn = optim.make_optimizer(opt, total_steps)
    spec = sp.StepSpec(
        graphs=(("policy", graph),), ref_graph=graph if live else None, loss=loss, tx=tx,
        lr=lr_fn, fields=frozenset({"reference"}), chunk_size=chunk_size, attention_span=span,
    )  # fmt: skip
    state = st.init_state({"policy": jax.tree.map(lambda x: x.copy(), params)}, tx, 0)
    step = jax.jit(functools.partial(sp.train_step, spec=spec), donate_argnums=0)
    return step, state, params if live else None


def with_cached_reference(batch: dict) -> dict:
    """The batch with ``ref_logps`` (zeros: their values do not change the timing)."""
    return {**batch, "ref_logps": np.zeros(batch["targets"].shape, np.float32)}


def compiled_gib(compiled) -> float | None:
    """XLA's memory of a compiled program: arguments + outputs + temporaries - aliased."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    total = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )  # fmt: skip
    return total / GIB


def peak_rss_gib() -> float:
    """VmHWM of this process (not ru_maxrss: Linux carries that over exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def matmul_peak(n: int = 2048, repeats: int = 7, dtype="float32") -> tuple[float, float]:
    """(wall, cpu) GFLOP/s of a jitted n×n matmul in ``dtype``: the device's practical peak."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
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
