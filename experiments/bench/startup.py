"""Start-up: seconds from a fresh interpreter to the first trained step, with and without
JAX's persistent compilation cache (`mipo_jax.compile_cache`).

The run is `mipo_jax.run` (what ``python -m mipo_jax.main`` does) of ``configs/dpo.py`` on
the issue's TRL comparison: a 7.1M-parameter Llama (width 256, 4 layers, MLP 688, 4 heads
of 64, vocabulary 7680, untied), 8 pairs per step of a 128-word prompt and 128-word
completions (``toy_words``, random words, written to a JSONL file), float32, AdamW, a live
reference, one step, no evaluation, checkpoint or export. "First step" is the time stamp of
step 1's metrics row minus the interpreter's start (wall), and the process's CPU seconds
(user + system, all threads: the fairer figure on a shared machine); every run is a fresh
process:

* ``off``: no persistent cache (what main does today);
* ``cold``: the cache on, empty (the first run of a new model or shape pays for writing it);
* ``warm``: the cache on, filled by the cold run (every later run).

    python -m experiments.bench.startup                # off, cold, warm, twice each
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORDS = ("boring", "lovely", "great", "awful", "bad", "fun", "good", "dull")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=["off", "cold", "warm"])
    p.add_argument(
        "--policy", nargs="*", default=[], help="model.KEY=VALUE (e.g. scan_layers=False)"
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=3, metavar=("MODE", "DATA", "CACHE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_pairs(path: str, n: int = 64, words: int = 128, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(words))
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps(dict(prompt=text(), chosen=text(), rejected=text())) + "\n")


def child(mode: str, data: str, cache: str, policy: list[str]) -> dict:
    t0 = time.time()
    if mode != "off":
        from mipo_jax import compile_cache

        compile_cache.enable(cache)
    import mipo_jax

    c = mipo_jax.get_config("dpo")
    c.model.update(
        vocab_size=7680, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
        num_kv_heads=4, head_dim=64, tie_embeddings=False, compute_dtype="float32",
    )  # fmt: skip
    for kv in policy:
        key, value = kv.split("=")
        old = c.model[key]
        c.model[key] = value == "True" if isinstance(old, bool) else type(old)(value)
    c.data.update(source=data, tokenizer="toy_words", max_length=264, batch_size=8)
    c.data.row_length = 264
    c.optim.update(name="adamw")
    c.train.update(num_steps=1, eval_batches=0, progress=False, task_eval_prompts=0)
    c.checkpoint.update(every=1000, async_save=False)
    c.export.update(hf=False, plot=False)
    with tempfile.TemporaryDirectory() as work:
        mipo_jax.run(c, work)
        with open(os.path.join(work, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    first = next(r["time"] for r in rows if r.get("split") == "train" and r["step"] == 1)
    cpu = os.times()  # the whole run's CPU seconds (one step, nothing after it but closing)
    return dict(
        mode=mode, first_step_s=first - t0, total_s=time.time() - t0,
        cpu_s=cpu.user + cpu.system, load=os.getloadavg()[0],
    )  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.policy)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        write_pairs(data)
        for r in range(args.repeats):
            cache = os.path.join(tmp, f"jax_cache_{r}")
            for mode in args.modes:
                cmd = [sys.executable, "-m", "experiments.bench.startup", "--child", mode, data,
                       cache, "--policy", *args.policy]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(out.stderr[-3000:])
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| cache | first step s (median) | runs |")
    print("|---|---|---|")
    for mode in args.modes:
        times = [r["first_step_s"] for r in rows if r["mode"] == mode]
        print(
            f"| {mode} | {statistics.median(times):.1f} | {', '.join(f'{t:.1f}' for t in times)} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
