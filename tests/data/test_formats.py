"""TRL formats round-trip: files of every type -> rows -> tokens -> batch -> decoded text."""

import json

import numpy as np
import pytest

from mipo_jax.data import Layout, PreferenceIterator, load_rows, tokenize_records, tokenize_rows
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.formats import split_text_prefix
from mipo_jax.data.packing import assemble_padded

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " It is 5."},
    {"prompt": "Name a colour.", "chosen": " Blue, like the sky.", "rejected": " Seven."},
    {"prompt": "Say hi", "chosen": " Hi!", "rejected": " Go away.", "extra": "ignored"},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
        "rejected": [{"role": "assistant", "content": "The capital of France is Lyon."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "What is 3 plus 4?"},
        ],
        "chosen": [{"role": "assistant", "content": "3 plus 4 is 7."}],
        "rejected": [{"role": "assistant", "content": "3 plus 4 is 8."}],
    },
]


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("chat_bpe")


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        frame = pd.DataFrame(rows)
        frame.to_parquet(path) if kind == "parquet" else frame.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_standard_round_trip_from_each_file_type(tmp_path, bpe, kind):
    path = write(tmp_path / f"d.{kind}", STANDARD, kind)
    data = tokenize_rows(load_rows(path), bpe)
    assert len(data) == 3 and data.report.kept == 3
    for i, row in enumerate(STANDARD):
        assert bpe.decode(data.prompt[i]) == row["prompt"]  # chat_bpe adds no BOS
        for side, key in enumerate(("chosen", "rejected")):
            ids = data.completions[side][i]
            assert ids[-1] == bpe.eos_token_id and list(ids).count(bpe.eos_token_id) == 1
            assert bpe.decode(ids[:-1]) == row[key]


def test_implicit_prompt_is_the_shared_prefix_cut_at_a_word(bpe):
    rows = [
        {
            "chosen": f"Q: {r['prompt']} A:{r['chosen']}",
            "rejected": f"Q: {r['prompt']} A:{r['rejected']}",
        }
        for r in STANDARD
    ]
    data = tokenize_records(rows, bpe)
    for i, r in enumerate(rows):
        prompt = bpe.decode(data.prompt[i])
        for side, key in enumerate(("chosen", "rejected")):
            assert prompt + bpe.decode(data.completions[side][i][:-1]) == r[key]
    assert bpe.decode(data.prompt[0]) == "Q: What is 2+2? A: It is"


@pytest.mark.parametrize(
    "a,b,prompt",
    [
        ("The answer is forty", "The answer is fifty", "The answer is"),
        ("2+2=4", "2+2=5", "2+2="),
        ("Q: hi? Yes", "Q: hi? No", "Q: hi?"),
        ("Hello", "Hello world", ""),
    ],
)
def test_split_text_prefix(a, b, prompt):
    p, ra, rb = split_text_prefix(a, b)
    assert (p, p + ra, p + rb) == (prompt, a, b) and ra and rb


def test_conversational_matches_the_chat_template(bpe):
    data = tokenize_records(CHAT, bpe)
    for i, row in enumerate(CHAT):
        prompt_text = bpe.apply_chat_template(
            row["prompt"], tokenize=False, add_generation_prompt=True
        )
        assert bpe.decode(data.prompt[i]) == prompt_text
        for side, key in enumerate(("chosen", "rejected")):
            full = bpe.apply_chat_template(row["prompt"] + row[key], tokenize=False)
            assert full.endswith("<|im_end|>\n")  # we stop at the EOS, dropping the newline
            assert bpe.decode(np.r_[data.prompt[i], data.completions[side][i]]) == full[:-1]


def test_conversational_implicit_prompt(bpe):
    rows = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CHAT
    ]
    implicit, explicit = tokenize_records(rows, bpe), tokenize_records(CHAT, bpe)
    for a, b in zip(
        (implicit.prompt, *implicit.completions), (explicit.prompt, *explicit.completions)
    ):
        np.testing.assert_array_equal(a.values, b.values)


def test_unpaired_labels_and_kl_rows(bpe):
    rows = [
        {"prompt": "Say hi", "completion": " Hi!", "label": True},
        {"prompt": "Say bye", "completion": " Go away, you.", "label": False},
        {"prompt": "Count", "completion": " 1 2 3", "label": True},
    ]
    data = tokenize_records(rows, bpe)
    assert data.num_completions == 1
    batch = assemble_padded(data, np.arange(3), 3, 32, 16)
    np.testing.assert_array_equal(batch["label"][:, 0], [1.0, 0.0, 1.0])
    assert batch["targets"].shape == (3, 1, 1, 16)
    for j in range(3):  # KL row j: prompt j + the completion of slot j+1 (cyclic)
        other = data.completions[0][(j + 1) % 3]
        n = int(batch["kl_mask"][j, 0, 0].sum())
        np.testing.assert_array_equal(batch["kl_targets"][j, 0, 0, :n], other)
        seq = batch["kl_tokens"][j, 0][batch["kl_segment_ids"][j, 0] > 0]
        np.testing.assert_array_equal(seq, np.r_[data.prompt[j], other])


def test_ref_logps_pass_through_every_layout(tmp_path, bpe):
    rows = [
        dict(r, ref_chosen_logps=-1.5 - i, ref_rejected_logps=-2.25 - i)
        for i, r in enumerate(STANDARD)
    ]
    data = tokenize_rows(load_rows(write(tmp_path / "d.jsonl", rows, "jsonl")), bpe)
    for layout in (Layout("padded", batch_size=1), Layout("shared_prompt", rows=1, row_length=64)):
        for b in PreferenceIterator(data, layout, num_epochs=1, drop_remainder=False):
            for g, s in zip(*np.nonzero(b["pair_valid"])):
                i = int(b["example_id"][g, s])
                np.testing.assert_array_equal(b["ref_logps"][g, s], [-1.5 - i, -2.25 - i])


def test_columns_are_renamed(tmp_path, bpe):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in STANDARD]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    loaded = load_rows(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    data = tokenize_rows(loaded, bpe)
    assert bpe.decode(data.prompt[2]) == "Say hi"


def test_hub_ids_go_to_datasets(monkeypatch):
    import datasets

    seen = {}

    def fake(path, name=None, *, split, revision):
        seen.update(path=path, name=name, split=split, revision=revision)
        return datasets.Dataset.from_list(STANDARD)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("trl-lib/ultrafeedback_binarized", split="test", revision="abc")
    assert seen == dict(
        path="trl-lib/ultrafeedback_binarized", name=None, split="test", revision="abc"
    )
    assert len(rows) == 3 and "prompt" in rows.column_names


def test_missing_local_file_is_not_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_rows(str(tmp_path / "nope.jsonl"))
