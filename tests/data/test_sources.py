"""Every kind of source: files and globs, save_to_disk folders, hub ids (offline cache), memory.

Hub datasets are tested against a cache laid out as the hub's (``datasets--ORG--NAME/refs``,
``snapshots/<commit>``) under ``HF_HUB_OFFLINE=1``: nothing here reaches a network.
"""

import json

import datasets
import numpy as np
import pytest

from mipo_jax.data import BadInputError, load_rows
from mipo_jax.data.embedded import load_tokenizer
from mipo_jax.data.load import SplitNotFoundError, has_one_split, source_kind
from mipo_jax.data.pipeline import build, data_config, eval_plan, split_rows, tokenize_split

ROWS = [{"prompt": f"good {i}", "chosen": "great", "rejected": "dull"} for i in range(6)]
TEST_ROWS = [{"prompt": f"bad {i}", "chosen": "great", "rejected": "dull"} for i in range(3)]


@pytest.fixture(autouse=True)
def tmp_caches(tmp_path, monkeypatch):
    """datasets' Arrow cache and the hub cache in tmp (never ~/.cache)."""
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path


def prompts(rows) -> list[str]:
    return [r["prompt"] for _, r in rows.iter(0, len(rows))]


def numbers(rows) -> list[int]:
    return [i for i, _ in rows.iter(0, len(rows))]


def test_save_to_disk_dataset_folder_is_one_split(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert source_kind(str(folder)) == "disk" and has_one_split(str(folder))
    for split in ("train", "test"):  # one split: used whole whatever the name
        rows = load_rows(str(folder), split=split)
        assert prompts(rows) == [r["prompt"] for r in ROWS] and rows.source == str(folder)


def test_save_to_disk_dataset_dict_folder_selects_its_split(tmp_path):
    folder = tmp_path / "dd"
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(TEST_ROWS)
    )
    dd.save_to_disk(str(folder))
    assert source_kind(folder) == "disk_dict" and not has_one_split(folder)
    assert prompts(load_rows(str(folder), split="test")) == [r["prompt"] for r in TEST_ROWS]
    rows = load_rows(str(folder))
    assert len(rows) == 6 and rows.source == f"{folder} (split 'train')"
    with pytest.raises(SplitNotFoundError, match=r"no split 'validation'; its splits are"):
        load_rows(str(folder), split="validation")
    try:
        load_rows(str(folder), split="validation")
    except SplitNotFoundError as e:
        assert sorted(e.splits) == ["test", "train"]


def write_repo(folder, rows_by_split):
    """A folder laid out as a hub dataset repo: data/<split>-00000-of-00001.parquet."""
    import pandas as pd

    (folder / "data").mkdir(parents=True)
    for split, rows in rows_by_split.items():
        pd.DataFrame(rows).to_parquet(folder / "data" / f"{split}-00000-of-00001.parquet")


def test_folder_of_data_files_has_the_splits_its_file_names_say(tmp_path):
    write_repo(tmp_path / "repo", {"train": ROWS, "test": TEST_ROWS})
    folder = str(tmp_path / "repo")
    assert source_kind(folder) == "folder"
    assert prompts(load_rows(folder, split="test")) == [r["prompt"] for r in TEST_ROWS]
    with pytest.raises(SplitNotFoundError, match=r"\['train', 'test'\]"):
        load_rows(folder, split="dev")


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_globs_of_each_file_type_concatenate_in_name_order(tmp_path, kind):
    import pandas as pd

    for part, rows in (("b", TEST_ROWS), ("a", ROWS)):
        path = tmp_path / f"{part}.{kind}"
        frame = pd.DataFrame(rows)
        if kind == "jsonl":
            frame.to_json(path, orient="records", lines=True)
        elif kind == "json":
            path.write_text(json.dumps(rows))
        elif kind == "csv":
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path)
    pattern = str(tmp_path / f"*.{kind}")
    rows = load_rows(pattern)
    assert prompts(rows) == [r["prompt"] for r in ROWS + TEST_ROWS]
    assert rows.source == f"{pattern} (2 files)" and has_one_split(pattern)


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def hub_dataset_cache(root, repo_id="org/prefs"):
    """Two commits of a hub dataset repo in a hub-layout cache: main -> A, tag v1 -> B."""
    repo = root / ("datasets--" + repo_id.replace("/", "--"))
    write_repo(repo / "snapshots" / COMMIT_A, {"train": ROWS, "test": TEST_ROWS})
    write_repo(repo / "snapshots" / COMMIT_B, {"train": ROWS[:2], "test": TEST_ROWS[:1]})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    (repo / "refs" / "v1").write_text(COMMIT_B)
    return repo_id


def test_hub_dataset_from_the_hub_cache_offline_at_its_revision(tmp_caches):
    repo_id = hub_dataset_cache(tmp_caches / "hub")
    assert source_kind(repo_id) == "hub" and not has_one_split(repo_id)
    assert len(load_rows(repo_id)) == 6 and len(load_rows(repo_id, split="test")) == 3
    assert len(load_rows(repo_id, revision="v1")) == 2  # a tag
    assert len(load_rows(repo_id, revision=COMMIT_B, split="test")) == 1  # a commit
    assert load_rows(repo_id, split="test").source == "org/prefs (split 'test')"
    with pytest.raises(SplitNotFoundError, match=r"org/prefs: no split 'dev'"):
        load_rows(repo_id, split="dev")


def test_hub_dataset_not_cached_offline_says_what_to_do(tmp_caches):
    with pytest.raises(FileNotFoundError, match=r"hf download --repo-type dataset org/absent"):
        load_rows("org/absent")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_rows("org/absent.jsonl")  # a data file name is never a hub id


def test_in_memory_dataset_dataset_dict_and_records():
    ds = datasets.Dataset.from_list(ROWS)
    assert source_kind(ds) == "memory" and prompts(load_rows(ds, split="anything")) == prompts(
        load_rows(ROWS)
    )
    dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_list(TEST_ROWS))
    assert source_kind(dd) == "memory_dict" and len(load_rows(dd, split="test")) == 3
    with pytest.raises(SplitNotFoundError, match=r"<in-memory DatasetDict>: no split 'dev'"):
        load_rows(dd, split="dev")
    with pytest.raises(TypeError, match="not int"):
        load_rows(3)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("d.jsonl", b"", "the file is empty: no rows"),
        ("d.jsonl", b"\n  \n", "the file is empty: no rows"),
        ("d.json", b"[]", "the file is empty: no rows"),
        ("d.csv", b"prompt,chosen,rejected\n", "the file is empty: no rows"),
        ("d.parquet", b"", "the file is empty: no rows"),
    ],
)
def test_an_empty_file_says_it_is_empty(tmp_path, name, content, message):
    """Not 'columns [] match no TRL format' (issue 12, item 10)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadInputError, match=rf"{name}: empty_source: {message}$") as e:
        load_rows(str(path))
    assert e.value.reason == "empty_source" and e.value.row is None


def test_empty_split_and_empty_in_memory_dataset(tmp_path):
    import pandas as pd

    pd.DataFrame({"prompt": [], "chosen": [], "rejected": []}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(BadInputError, match=r"e\.parquet: empty_source: the file is empty"):
        load_rows(str(tmp_path / "e.parquet"))
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list([])
    )
    with pytest.raises(BadInputError, match=r"\(split 'test'\): empty_source: it is empty"):
        load_rows(dd, split="test")


# -- the data section: which rows train and which evaluate -------------------------------


def test_eval_fraction_holds_out_fixed_rows_disjoint_from_training(tmp_path):
    rows = [dict(r, prompt=f"good {i}") for i, r in enumerate(ROWS * 5)]  # 30 rows
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data_config(source=str(path), eval_fraction=0.2)
    train, held = split_rows(cfg, "train"), split_rows(cfg, "eval")
    assert len(held) == 6 and len(train) == 24
    assert sorted(numbers(train) + numbers(held)) == list(range(30))  # disjoint, complete
    assert prompts(held) == [rows[i]["prompt"] for i in numbers(held)]  # source row numbers
    assert numbers(
        split_rows(data_config(source=str(path), eval_fraction=0.2, seed=7), "eval")
    ) == (numbers(held))  # independent of data.seed
    tok = load_tokenizer("toy_words")
    data = tokenize_split(cfg, tok, role="eval")
    assert list(data.example_id) == numbers(held)  # example ids are source rows
    cfg.num_epochs, cfg.drop_remainder = 1, False
    it, _ = build(cfg, tokenizer=tok, role="train", process_index=0, process_count=1)
    seen = [int(i) for b in it for i in b["example_id"].ravel() if i >= 0]
    assert sorted(seen) == numbers(train) and not set(seen) & set(numbers(held))


def test_eval_rows_come_from_the_eval_split_which_must_exist(tmp_path):
    cfg = data_config(source="embedded:arithmetic")
    assert split_rows(cfg, "eval").source.endswith("arithmetic/test.jsonl")
    with pytest.raises(ValueError, match=r"embedded datasets have splits \('train', 'test'\)"):
        split_rows(data_config(source="embedded:arithmetic", eval_split="dev"), "eval")
    folder = tmp_path / "dd"
    datasets.DatasetDict(
        train=datasets.Dataset.from_list(ROWS), valid=datasets.Dataset.from_list(TEST_ROWS)
    ).save_to_disk(str(folder))
    with pytest.raises(SplitNotFoundError, match=r"no split 'test'; its splits are"):
        split_rows(data_config(source=str(folder)), "eval")
    assert len(split_rows(data_config(source=str(folder), eval_split="valid"), "eval")) == 3


def test_a_one_split_source_has_no_eval_split_of_its_own(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = data_config(source=str(path))
    assert len(split_rows(cfg, "train")) == 6 and eval_plan(cfg, "train")[0] == str(path)
    for check in (lambda: split_rows(cfg, "eval"), lambda: eval_plan(cfg)):  # eval_plan: no load
        with pytest.raises(ValueError, match=r"d\.jsonl is one split .* data\.eval_fraction"):
            check()
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\), got 1\.0"):
        eval_plan(data_config(source=str(path), eval_fraction=1.0))
    assert len(split_rows(data_config(source=str(path), eval_split="train"), "eval")) == 6
    other = tmp_path / "e.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in TEST_ROWS))
    assert len(split_rows(data_config(source=str(path), eval_source=str(other)), "eval")) == 3
    with pytest.raises(ValueError, match="not both"):
        split_rows(data_config(source=str(path), eval_source=str(other), eval_fraction=0.5), "eval")


def test_in_memory_train_and_eval_data_through_the_data_functions():
    tok = load_tokenizer("toy_words")
    cfg = data_config(tokenizer="toy_words")  # source stays the default: train_data wins
    ds = datasets.Dataset.from_list(ROWS)
    assert prompts(split_rows(cfg, "train", train_data=ds)) == [r["prompt"] for r in ROWS]
    assert len(split_rows(cfg, "eval", train_data=ds, eval_data=TEST_ROWS)) == 3
    dd = datasets.DatasetDict(train=ds, test=datasets.Dataset.from_list(TEST_ROWS))
    assert len(split_rows(cfg, "eval", train_data=dd)) == 3  # the DatasetDict's test split
    with pytest.raises(ValueError, match=r"<in-memory Dataset> is one split"):
        split_rows(cfg, "eval", train_data=ds)
    it, _ = build(data_config(), train_data=ds, tokenizer=tok, process_index=0, process_count=1)
    assert len(it.data) == 6
    with pytest.raises(ValueError, match="data.tokenizer is required for in-memory data"):
        build(data_config(), train_data=ds)
    held = split_rows(data_config(eval_fraction=0.5), "eval", train_data=ds)
    assert len(held) == 3 and len(split_rows(data_config(eval_fraction=0.5), train_data=ds)) == 3
    assert np.all(np.diff(numbers(held)) > 0)
