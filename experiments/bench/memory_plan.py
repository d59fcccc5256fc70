"""Per-device memory of one DPO train step on pod-sized meshes, by simulation on this CPU.

For the model shapes of ``configs/llama3_1b.py`` and ``configs/llama3_8b.py`` (random
weights that are never materialised: every input is a ``jax.ShapeDtypeStruct``), the real
train step of `mipo_jax.train.step` is lowered and compiled ahead of time on a mesh of
simulated CPU devices (``--xla_force_host_platform_device_count``; one subprocess per
device count, since the count is fixed when JAX starts), and XLA's memory analysis of the
compiled program gives, per device: arguments (train state, live reference, batch),
outputs (the new state), temporaries, the aliased (donated) part, and their total
``arguments + outputs + temporaries − aliased``.

Each case: model × mesh (data × fsdp × tensor) × reference (``live``: a frozen float32
copy of the weights is an argument of the step; ``cached``: the batch carries reference
log-probs) × remat (``none`` / ``full``). The config decides everything else (AdamW,
float32 parameters, bfloat16 compute, rows of ``data.row_length`` tokens with completions
of ``data.completion_width``); each (data, fsdp) shard of the batch holds ``--pairs``
preference pairs (2 rows each) per micro-batch.

LoRA is not implemented in the trainer yet: its column is an *analytic estimate* (frozen
base weights in bfloat16, rank-``--lora-rank`` adapters on q, k, v, o, gate, up, down with
float32 weights, gradients and two AdamW moments, everything sharded like the base weights,
no reference copy: the reference is the base with the adapters off), without activations.

    python -m experiments.bench.memory_plan --json /tmp/plan.json        # the README table
    python -m experiments.bench.memory_plan --models llama3_1b:tiny --sizes 8   # CI's size
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time

GIB = 2.0**30
MODELS = ("llama3_1b", "llama3_8b")
# (data, fsdp, tensor) per device count: FSDP over everything, and FSDP with 4-way tensor.
MESHES = {
    8: ((1, 8, 1), (1, 2, 4)),
    64: ((1, 64, 1), (1, 16, 4)),
    256: ((1, 256, 1), (1, 64, 4)),
}
VARIANTS = (("live", "none"), ("live", "full"), ("cached", "none"), ("cached", "full"))
LORA_TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}  # input axes
DEVICE_MEMORY_GIB = {"v5e": 16, "v5p": 95, "H100": 80}
_TAG = "MEMORY_PLAN "


@dataclasses.dataclass(frozen=True)
class Case:
    model: str  # configs/<name>.py[:arg]
    mesh: tuple  # (data, fsdp, tensor)
    reference: str  # live | cached
    remat: str  # none | full | dots_saveable | ...
    pairs: int = 1  # pairs per (data, fsdp) shard of the batch
    mesh_context: bool = True  # trace under jax.set_mesh (activation sharding constraints)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh)


def load_config(case: Case):
    """The model's config with the case's reference mode, remat and mesh."""
    import importlib

    name, _, arg = case.model.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(arg or None)
    config.reference.mode = case.reference
    config.model.remat = case.remat
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), case.mesh)))
    config.batch_size = case.pairs * case.mesh[0] * case.mesh[1]
    return config


def model_config(config):
    """`ModelConfig` of a random model of the config's shape (vocabulary: the config's, or
    its tokenizer's size when ``model.vocab_size`` is 0)."""
    from mipo_jax.train.modules import random_config

    vocab = int(config.model.vocab_size)
    if not vocab:
        from mipo_jax.data.embedded import load_tokenizer
        from mipo_jax.data.pipeline import tokenizer_name

        vocab = len(load_tokenizer(tokenizer_name(config.data)))
    with config.unlocked():
        config.model.vocab_size = vocab
    return random_config(config.model, _Vocab(vocab))


class _Vocab:
    """What `random_config` reads from a tokenizer (the special ids do not change memory)."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def host_batch(config, with_ref_logps: bool) -> dict:
    """One global batch (numpy) of the config's padded layout, from the real data pipeline:
    ``batch_size`` synthetic pairs whose rows fill ``row_length`` tokens exactly."""
    import numpy as np

    from mipo_jax.data.encoding import Tokenized
    from mipo_jax.data.iterator import PreferenceIterator
    from mipo_jax.data.packing import Layout
    from mipo_jax.data.ragged import Ragged
    from mipo_jax.data.report import Report

    d, n = config.data, int(config.batch_size)
    t, c = int(d.row_length), int(d.completion_width)
    if d.layout != "padded":
        raise ValueError(f"data.layout={d.layout!r}: the plan measures the padded layout")
    data = Tokenized(
        prompt=Ragged.from_lists([[5] * (t - c)] * n),
        completions=tuple(Ragged.from_lists([[6] * c] * n) for _ in range(2)),
        example_id=np.arange(n, dtype=np.int64),
        ref_logps=None,
        label=None,
        pad_id=0,
        report=Report("synthetic", "error"),
    )
    layout = Layout(kind="padded", batch_size=n, row_length=t, completion_width=c)
    it = PreferenceIterator(data, layout, seed=0, num_epochs=1, process_index=0, process_count=1)
    batch = next(iter(it))
    batch.pop("example_id", None)
    if with_ref_logps:
        batch["ref_logps"] = np.zeros(batch["targets"].shape, np.float32)
    return batch


def lower_step(config, mesh, batch: dict, *, mesh_context: bool = True):
    """The trainer's jitted DPO train step, lowered for abstract inputs on ``mesh``.

    The one place that assembles the step (as `mipo_jax.train.setup.build` does: the
    policy's parameters and their shardings from the models' logical names, the optimiser
    state following them, a live reference as a frozen copy
    with the policy's shardings, the batch sharded over ('data', 'fsdp'), the state
    donated). Nothing is materialised. Returns ``(lowered, abstract_args)``.
    """
    import jax
    import ml_collections as mlc
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mipo_jax.losses import required_inputs
    from mipo_jax.models import CausalLM
    from mipo_jax.train import optim
    from mipo_jax.train import state as st
    from mipo_jax.train.step import StepSpec, train_step

    cfg = model_config(config)
    graph, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    p_sh = st.param_shardings(abstract, mesh)
    params = nnx.to_pure_dict(abstract)
    tx, lr = optim.make_optimizer(config.optim, int(config.train.num_steps))
    live = config.reference.mode == "live"
    spec = StepSpec(
        graphs=(("policy", graph),),
        ref_graph=graph if live else None,
        loss=mlc.FrozenConfigDict(config.loss),
        tx=tx,
        lr=lr,
        fields=required_inputs(config.loss),
        grad_accum=1,  # one micro-batch: what the memory holds at once
        chunk_size=int(config.train.logps_chunk),
        bos_id=int(cfg.bos_token_id or 0),
    )
    state = jax.eval_shape(lambda p: st.init_state(p, tx, config.seed), {"policy": params})
    state_sh = st.state_shardings(state, tx, {"policy": p_sh}, mesh)
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    args = (
        st.abstract(state, state_sh),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in batch.items()},
        st.abstract(params, p_sh) if live else None,
    )
    step = jax.jit(
        functools.partial(train_step, spec=spec),
        in_shardings=(state_sh, batch_sh, p_sh if live else None),
        out_shardings=(state_sh, st.replicated(mesh)),
        donate_argnums=0,
    )
    if not mesh_context:
        return step.lower(*args), args
    with jax.set_mesh(mesh):
        return step.lower(*args), args


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (its first device)."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _adapter_params(shape, inputs: int, rank: int) -> int:
    """A [in, r] and B [r, out] per layer of a stacked kernel [L, *in, *out]."""
    k = 1 + inputs
    return shape[0] * rank * (math.prod(shape[1:k]) + math.prod(shape[k:]))


def lora_estimate(cfg, mesh, rank: int) -> dict:
    """Analytic per-device bytes of a LoRA step's state (no activations).

    Frozen base weights in bfloat16 with the full model's shardings; rank-``rank`` adapters
    ``A [in, r]``, ``B [r, out]`` on every `LORA_TARGETS` kernel with float32 weights,
    gradients and two AdamW moments (16 bytes per adapter parameter) spread evenly over the
    fsdp × tensor devices (as the full model's optimiser state is, up to indivisible small
    tensors); no reference copy (the reference is the base with the adapters off).
    """
    from flax import nnx

    from mipo_jax.models import CausalLM
    from mipo_jax.train import state as st

    _, abstract = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    shardings = st.param_shardings(abstract, mesh)
    base = base_local = adapters = 0
    for path, var in nnx.to_flat_state(abstract):
        sharding = shardings
        for key in path:
            sharding = sharding[key]
        local = sharding.shard_shape(var.shape)
        base, base_local = base + math.prod(var.shape), base_local + math.prod(local)
        names = [str(p) for p in path]
        if names[0] == "layers" and names[-1] == "kernel" and names[-2] in LORA_TARGETS:
            k = LORA_TARGETS[names[-2]]
            adapters += _adapter_params(var.shape, k, rank)
    return {
        "base_params": base,
        "adapter_params": adapters,
        "state_bytes": 2 * base_local + 16 * adapters / (mesh.shape["fsdp"] * mesh.shape["tensor"]),
    }


def measure(case: Case, lora_rank: int) -> dict:
    """Compile the case's step; XLA's per-device memory analysis plus checks and timings."""
    import jax

    from mipo_jax.sharding import make_mesh

    config = load_config(case)
    mesh = make_mesh(case.mesh, devices=jax.devices()[: case.devices])
    batch = host_batch(config, with_ref_logps=case.reference == "cached")
    t0 = time.perf_counter()
    lowered, args = lower_step(config, mesh, batch, mesh_context=case.mesh_context)
    t1 = time.perf_counter()
    mem = lowered.compile().memory_analysis()
    t2 = time.perf_counter()
    cfg = model_config(config)
    out = dataclasses.asdict(case)
    out.update(
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(args[0].params)),
        argument=mem.argument_size_in_bytes,
        output=mem.output_size_in_bytes,
        temp=mem.temp_size_in_bytes,
        alias=mem.alias_size_in_bytes,
        total=mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes,
        expected_argument=shard_bytes(args),  # independent count of the argument shards
        state_bytes=shard_bytes(args[0]),
        reference_bytes=shard_bytes(args[2]) if args[2] is not None else 0,
        batch_bytes=shard_bytes(args[1]),
        lora=lora_estimate(cfg, mesh, lora_rank),
        row_length=int(config.data.row_length),
        completion_width=int(config.data.completion_width),
        lower_s=round(t1 - t0, 1),
        compile_s=round(t2 - t1, 1),
        host_peak_rss=_peak_rss(),
    )
    return out


def _peak_rss() -> int | None:
    """This process's peak resident memory so far, bytes (VmHWM; None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- processes: one child per device count ------------------------------------------------


def child(devices: int, cases: list[dict], lora_rank: int) -> None:
    """Measure ``cases`` (all on ``devices`` simulated devices); one JSON line per case."""
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    for c in cases:
        row = measure(Case(**{**c, "mesh": tuple(c["mesh"])}), lora_rank)
        print(_TAG + json.dumps(row), flush=True)


def run_children(cases: list[Case], lora_rank: int, timeout: float) -> list[dict]:
    """One subprocess per device count (its own XLA_FLAGS), in order; their rows."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = []
    for n in sorted({c.devices for c in cases}):
        todo = [dataclasses.asdict(c) for c in cases if c.devices == n]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "experiments.bench.memory_plan", "--child", str(n)]
        cmd += ["--lora-rank", str(lora_rank), "--cases", json.dumps(todo)]
        print(f"{n} devices: {len(todo)} cases ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
        )
        got = [json.loads(x[len(_TAG) :]) for x in proc.stdout.splitlines() if x.startswith(_TAG)]
        if proc.returncode != 0 or len(got) != len(todo):
            raise RuntimeError(f"{n}-device child failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")  # fmt: skip
        rows += got
    return rows


# ---- the tables ---------------------------------------------------------------------------


UNITS = {"GiB": 2.0**30, "MiB": 2.0**20}
_unit = ["GiB"]


def _gib(x: float) -> str:
    return f"{x / UNITS[_unit[0]]:.2f}"


def _fits(total: float) -> str:
    return " ".join(k for k, v in DEVICE_MEMORY_GIB.items() if total <= v * GIB) or "-"


def table(rows: list[dict]) -> str:
    """Markdown: one line per case, per device (``--unit``)."""
    head = (
        f"| model | devices | data×fsdp×tensor | pairs/shard | reference | remat | arguments | "
        f"outputs | temporaries | aliased | **total** ({_unit[0]}) | fits | compile s |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mesh = "×".join(map(str, r["mesh"]))
        ctx = "" if r["mesh_context"] else " (no set_mesh)"
        lines.append(
            f"| {r['model']} | {math.prod(r['mesh'])} | {mesh} | {r['pairs']} | {r['reference']} | "
            f"{r['remat']}{ctx} | {_gib(r['argument'])} | {_gib(r['output'])} | "
            f"{_gib(r['temp'])} | {_gib(r['alias'])} | **{_gib(r['total'])}** | "
            f"{_fits(r['total'])} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict], rank: int) -> str:
    """Markdown: per model and mesh, the total per device of each variant, the train state
    (with the live reference) and the LoRA state estimate."""
    variants = list(dict.fromkeys((r["reference"], r["remat"]) for r in rows))
    groups: dict = {}
    for r in rows:
        key = (r["model"], tuple(r["mesh"]), r["pairs"], r["mesh_context"])
        groups.setdefault(key, {})[(r["reference"], r["remat"])] = r
    cols = " | ".join(f"{ref} ref., remat {remat}" for ref, remat in variants)
    lines = [
        f"| model | devices | data×fsdp×tensor | {cols} | state + live ref. | "
        f"LoRA r={rank} state (est.) |",
        "|" + "---|" * (len(variants) + 5),
    ]
    for (model, mesh, pairs, ctx), cells in groups.items():
        mark = ("" if pairs == 1 else f", {pairs} pairs") + ("" if ctx else ", no set_mesh")
        totals = " | ".join(_gib(cells[v]["total"]) if v in cells else "–" for v in variants)
        any_row = next(iter(cells.values()))
        live = cells.get(("live", "none")) or cells.get(("live", "full"))
        state = _gib(live["state_bytes"] + live["reference_bytes"]) if live else "–"
        lines.append(
            f"| {model}{mark} | {math.prod(mesh)} | {'×'.join(map(str, mesh))} | {totals} | "
            f"{state} | {_gib(any_row['lora']['state_bytes'])} |"
        )
    return "\n".join(lines)


def lora_table(rows: list[dict], rank: int) -> str:
    """Markdown: the train state per device, full fine-tune (measured) against LoRA (est.)."""
    lines = [
        f"| model | data×fsdp×tensor | full FT: state + live reference, {_unit[0]} (measured) | "
        f"LoRA r={rank}: state, {_unit[0]} (estimate) | adapter parameters |",
        "|---|---|---|---|---|",
    ]
    seen = set()
    for r in rows:
        key = (r["model"], tuple(r["mesh"]))
        if r["reference"] != "live" or key in seen:
            continue
        seen.add(key)
        lo = r["lora"]
        lines.append(
            f"| {r['model']} | {'×'.join(map(str, r['mesh']))} | "
            f"{_gib(r['state_bytes'] + r['reference_bytes'])} | {_gib(lo['state_bytes'])} | "
            f"{lo['adapter_params'] / 1e6:.1f}M |"
        )
    return "\n".join(lines)


def cases_for(args) -> list[Case]:
    out = []
    for model in args.models:
        for n in args.sizes:
            for mesh in args.meshes or MESHES[n]:
                if math.prod(mesh) != n:
                    continue
                for reference, remat in args.variants:
                    out.append(
                        Case(model, mesh, reference, remat, args.pairs, not args.no_set_mesh)
                    )
    return out


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help="configs/<name>.py[:arg]")
    p.add_argument("--sizes", nargs="+", type=int, default=sorted(MESHES), choices=sorted(MESHES))
    p.add_argument(
        "--variants", nargs="+", default=[f"{a}/{b}" for a, b in VARIANTS],
        help="reference/remat pairs, e.g. live/full cached/none",
    )  # fmt: skip
    p.add_argument("--meshes", nargs="+", help="data,fsdp,tensor sizes instead of MESHES")
    p.add_argument("--unit", default="GiB", choices=sorted(UNITS))
    p.add_argument("--pairs", type=int, default=1, help="pairs per (data, fsdp) batch shard")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-set-mesh", action="store_true", help="trace without jax.set_mesh")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="per device count, seconds")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--load", nargs="+", help="print the tables of saved --json files instead")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cases", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [tuple(v.split("/")) for v in args.variants]
    args.meshes = [tuple(int(x) for x in m.split(",")) for m in args.meshes or ()]
    return args


def main(argv=None) -> None:
    args = _parse(argv)
    if args.child:
        child(args.child, json.loads(args.cases), args.lora_rank)
        return
    _unit[0] = args.unit
    if args.load:
        rows = [row for path in args.load for row in json.load(open(path))]
    else:
        rows = run_children(cases_for(args), args.lora_rank, args.timeout)
    print(summary(rows, args.lora_rank))
    print()
    print(table(rows))
    print()
    print(lora_table(rows, args.lora_rank))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
