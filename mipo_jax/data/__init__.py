"""Preference data: TRL formats in, exact token boundaries, padded or packed batches out.

Pipeline (each step is a module; `pipeline.build` chains them from a config):

1. `load.load_rows`: rows from local json/jsonl/parquet/csv files or globs, ``save_to_disk``
   folders, hub ids (offline: the hub cache), ``embedded:NAME``, or an in-memory
   ``datasets.Dataset``/``DatasetDict``; `pipeline.split_rows` picks a role's rows (train,
   or eval: another source, a split that must exist, or held-out ``eval_fraction``).
2. `formats`: TRL's standard / implicit-prompt / conversational / unpaired rows, checked.
3. `encoding.tokenize_rows`: one BOS, EOS after each completion, truncation, bad-input
   policy (`report`), of the whole split (every process tokenises every row).
4. `iterator.PreferenceIterator`: deterministic, resumable batches in one of three layouts
   (`packing`): ``padded`` (pair axis), ``pairs`` (pair packing), ``shared_prompt``; one
   global batch stream whatever the process count, each process yielding its block.
5. `iterator.to_global`: a process's block -> global ``jax.Array``s.

A batch is a dict of arrays in the train step's group layout (`mipo_jax.train.step_batch`);
`batch` documents every field and shape. Every layout is used the same way::

    rows = lambda x: x.reshape(-1, x.shape[-1])                     # [G, K, T] -> [G*K, T]
    h = model.hidden(rows(b["tokens"]), rows(b["positions"]), rows(b["segment_ids"]),
                     attend_to=None if "attend_to" not in b else rows(b["attend_to"]))
    h = gather_slots(h.reshape(G, K, T, -1), b["pred_index"])     # [G, P, S, C, D]
    logp = token_logps(h @ w_unembed, b["targets"])                # * b["mask"]

Embedded datasets and tokenizers: `embedded`; the tasks' exact quantities: `tasks`; the
model-vocabulary check the trainer runs before its first step: `vocab.check_vocab`.
"""

from mipo_jax.data.batch import LAYOUTS, attention_mask, gather_slots
from mipo_jax.data.encoding import Limits, Tokenized, tokenize_records, tokenize_rows
from mipo_jax.data.iterator import PreferenceIterator, to_global
from mipo_jax.data.load import SplitNotFoundError, load_rows
from mipo_jax.data.packing import Layout
from mipo_jax.data.pipeline import build, data_config, split_rows
from mipo_jax.data.report import BadInputError, Report
from mipo_jax.data.vocab import VocabularyError, check_vocab

__all__ = [
    "LAYOUTS",
    "BadInputError",
    "Layout",
    "Limits",
    "PreferenceIterator",
    "Report",
    "SplitNotFoundError",
    "Tokenized",
    "VocabularyError",
    "attention_mask",
    "gather_slots",
    "build",
    "check_vocab",
    "data_config",
    "load_rows",
    "split_rows",
    "to_global",
    "tokenize_records",
    "tokenize_rows",
]
