"""Tokenisation: exactly one BOS, one EOS ending each completion, truncation that keeps both.

Each row becomes ``prompt`` token ids and one token list per completion, stored ragged in
`Tokenized`. The loss later reads completion tokens only.

* **Standard (string) rows**: prompt and each completion are tokenised separately without
  special tokens (so the prompt's tokens are the same for chosen and rejected and equal to
  what the model sees at generation time); BOS is prepended when the tokenizer itself adds
  one (``add_bos="auto"``), and EOS is appended to each completion.
* **Conversational rows**: the prompt is ``apply_chat_template(prompt,
  add_generation_prompt=True)``; a completion is the template's rendering of
  ``prompt + completion`` minus that prefix. BOS comes only from the template (as in
  ``apply_chat_template(tokenize=True)``), never also from the tokenizer.
* Every message role must be one the chat template knows (`formats.template_roles`), and
  one dataset is all strings or all conversations (else ``mixed_formats``).
* Leading repeated BOS collapse to one. A completion ends at its first EOS (dropping, e.g.,
  the newline a ChatML template writes after ``<|im_end|>``), or gets an EOS appended.

Truncation never cuts a token (it works on token ids, not characters), never removes the
BOS or the chat template's generation prompt (``<|im_start|>assistant\\n``), drops whole
conversation turns before cutting inside a message (`PromptCutter`), and never empties a
completion or a prompt (a prompt keeps at least its BOS or, without one, its last token, so
the first completion token is predicted from its own sequence; a row that cannot keep one
prompt and one completion token is bad input instead). With ``max_completion_length`` a
completion keeps its start (losing its EOS); with ``max_prompt_length`` and ``max_length``,
``truncation_mode="keep_end"`` (TRL's default) drops the start of the prompt body first and
only then completion ends; ``"keep_start"`` drops completion ends.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from mipo_jax.data import formats
from mipo_jax.data.load import Rows
from mipo_jax.data.ragged import Ragged
from mipo_jax.data.report import BadInputError, BadRow, Report

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Length limits in tokens (None = no limit) and the truncation mode."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_end"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {v}")


@dataclasses.dataclass
class Tokenized:
    """A tokenised split: N examples, K completions each.

    Attributes:
      prompt: ragged prompt ids (BOS included).
      completions: K ragged completion id lists (EOS included unless truncated).
      example_id: [N] global row index in the source (for debugging and de-duplication).
      ref_logps: [N, K] float32 precomputed reference log-probs, or None.
      label: [N] bool for unpaired data (True = desirable), else None.
      pad_id: the id written into padding (never read by the loss: masks decide).
      report: what was skipped or truncated, and why.
    """

    prompt: Ragged
    completions: tuple[Ragged, ...]
    example_id: np.ndarray
    ref_logps: np.ndarray | None
    label: np.ndarray | None
    pad_id: int
    report: Report

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def num_completions(self) -> int:
        return len(self.completions)

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt lengths [N], completion lengths [N, K])."""
        return self.prompt.lengths, np.stack([c.lengths for c in self.completions], axis=1)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own post-processor puts BOS in front of a text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


class Encoder:
    """Turns `formats.Record`s into token ids for one tokenizer (HF fast tokenizer API)."""

    def __init__(self, tokenizer, *, add_bos: bool | str = "auto", eos_token: str | None = None):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = (
            tokenizer.convert_tokens_to_ids(eos_token) if eos_token else tokenizer.eos_token_id
        )
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; pass eos_token=...")
        if eos_token and tokenizer.convert_ids_to_tokens(self.eos_id) != eos_token:
            raise ValueError(f"eos_token {eos_token!r} is not a single token of this tokenizer")
        self.add_bos = tokenizer_adds_bos(tokenizer) if add_bos == "auto" else bool(add_bos)
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)

    @functools.cached_property
    def roles(self) -> tuple[str, ...]:
        """The message roles the tokenizer's chat template knows (`formats.template_roles`)."""
        return formats.template_roles(getattr(self.tokenizer, "chat_template", None))

    def texts(self, record: formats.Record) -> tuple[str, list[str]]:
        """(prompt text, completion texts); chat templates applied for conversational rows."""
        if not record.conversational:
            return record.prompt, list(record.completions)
        parts = ("prompt", *_parts(len(record.completions)))
        formats.check_roles(list(zip(parts, (record.prompt, *record.completions))), self.roles)
        render = self.tokenizer.apply_chat_template
        try:
            prompt = render(list(record.prompt), tokenize=False, add_generation_prompt=True)
            fulls = [render(list(record.prompt + c), tokenize=False) for c in record.completions]
        except Exception as e:  # jinja raises on, e.g., roles that do not alternate
            raise BadRow("template_error", f"chat template failed: {e}") from None
        if not all(f.startswith(prompt) for f in fulls):
            raise BadRow("template_error", "the template's prompt is not a prefix of prompt+reply")
        return prompt, [f[len(prompt) :] for f in fulls]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, no special tokens added (batched, in Rust when possible)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # what the fast tokenizer's __call__ runs, minus its overhead
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def finish_prompt(self, ids: list[int], conversational: bool) -> list[int]:
        """Exactly one BOS where the tokenizer (standard) or the template (chat) wants one."""
        if self.add_bos and not conversational and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        while self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            ids = ids[1:]
        if not ids:
            raise BadRow("empty_prompt", "the prompt has no tokens (no BOS and no text)")
        return ids

    def finish_completion(self, ids: list[int]) -> list[int]:
        """End at the first EOS, or append one."""
        if self.eos_id in ids:
            return ids[: ids.index(self.eos_id) + 1]
        return ids + [self.eos_id]

    def protected_tail(self, record: formats.Record, prompt_ids: list[int]) -> int:
        """Number of trailing prompt tokens that are the chat template's generation prompt."""
        if not record.conversational or not record.prompt:
            return 0
        bare = self.tokenizer.apply_chat_template(list(record.prompt), tokenize=False)
        bare_ids = self.finish_prompt(self.encode([bare])[0], True) if bare else []
        n = len(bare_ids)
        return len(prompt_ids) - n if prompt_ids[:n] == bare_ids else 0


class PromptCutter:
    """Shortens one prompt to ``n`` tokens, keeping its BOS and generation prompt.

    A conversational prompt under ``keep_end`` first loses whole user/assistant exchanges,
    oldest first (a leading system message stays), re-rendered by the chat template; only
    if its last message alone is still too long is it cut token by token.
    """

    def __init__(self, enc: Encoder, record: formats.Record, prompt: list[int]):
        self.enc, self.record, self.prompt = enc, record, prompt
        self.head = int(enc.bos_id is not None and prompt[:1] == [enc.bos_id])

    @functools.cached_property
    def tail(self) -> int:
        return self.enc.protected_tail(self.record, self.prompt)

    @property
    def minimum(self) -> int:
        return self.head + self.tail

    def cut(self, p: list[int], n: int, keep_end: bool) -> list[int]:
        if len(p) <= n:
            return p
        if n < self.minimum:
            raise BadRow(
                "prompt_too_long",
                f"the prompt's BOS/generation-prompt tokens ({self.minimum}) exceed the limit {n}",
            )
        if keep_end and self.record.conversational:
            for shorter in self._fewer_turns():
                p = shorter
                if len(p) <= n:
                    return p
        head, tail, keep = self.head, self.tail, n - self.minimum
        body = p[head : len(p) - tail]
        body = body[len(body) - keep :] if keep_end else body[:keep]
        return p[:head] + body + p[len(p) - tail :]

    def _fewer_turns(self):
        msgs = self.record.prompt
        system = msgs[:1] if msgs and msgs[0]["role"] == "system" else ()
        rest = msgs[len(system) :]
        render = self.enc.tokenizer.apply_chat_template
        for k in range(2, len(rest), 2):
            text = render(list(system + rest[k:]), tokenize=False, add_generation_prompt=True)
            yield self.enc.finish_prompt(self.enc.encode([text])[0], True)


def truncate(
    prompt: list[int], completions: list[list[int]], limits: Limits, cutter: PromptCutter
) -> tuple[list[int], list[list[int]]]:
    """Apply ``limits`` to one example (``cutter`` shortens its prompt).

    The prompt keeps at least one token (its BOS, or with no BOS its last token) so that the
    first completion token is predicted from a position of its own sequence; a row whose
    limits leave no room for one prompt and one completion token is `BadRow`.
    """
    keep_end = limits.truncation_mode == "keep_end"
    cs = completions
    if limits.max_completion_length is not None:
        cs = [c[: limits.max_completion_length] for c in cs]
    p = prompt
    if limits.max_prompt_length is not None:
        p = cutter.cut(p, limits.max_prompt_length, keep_end)
    if limits.max_length is not None:
        longest = max(len(c) for c in cs)
        if len(p) + longest > limits.max_length:
            if keep_end:
                p = cutter.cut(p, max(limits.max_length - longest, cutter.minimum, 1), True)
            room = limits.max_length - len(p)
            if room < 1:
                raise BadRow(
                    "empty_after_truncation",
                    f"the prompt ({len(p)} tokens, at least 1 kept) leaves no room for a "
                    f"completion within max_length={limits.max_length} under "
                    f"truncation_mode={limits.truncation_mode!r}",
                )
            cs = [c[:room] for c in cs]
    if len(cs) == 2 and cs[0] == cs[1]:
        raise BadRow("identical_after_truncation", "chosen and rejected are equal after truncation")
    return p, cs


def _parts(k: int) -> tuple[str, ...]:
    return ("chosen", "rejected") if k == 2 else ("completion",)


def tokenize_rows(
    rows: Rows,
    tokenizer,
    *,
    kind: str = "auto",
    limits: Limits = Limits(),
    bad_input: str = "error",
    add_bos: bool | str = "auto",
    eos_token: str | None = None,
    chunk: int = 1024,
) -> Tokenized:
    """Check, render and tokenise every row of ``rows`` (each process holds the whole split)."""
    kind = formats.detect_kind(rows.column_names, kind, rows.source)
    enc = Encoder(tokenizer, add_bos=add_bos, eos_token=eos_token)
    report = Report(rows.source, bad_input)
    k = 1 if kind == "unpaired" else 2
    out: dict[str, list] = {"prompt": [], "comp": [], "id": [], "ref": [], "label": []}
    forms: dict[bool, int] = {}  # conversational? -> first row of that form
    it = rows.iter(0, len(rows))
    while batch := _take(it, chunk):
        _tokenize_chunk(batch, kind, enc, limits, report, out, forms)
    report.kept = len(out["id"])
    if report.kept == 0:
        raise ValueError(f"{rows.source}: no usable rows.\n{report.summary()}")
    has_ref = any(r is not None for r in out["ref"])
    if has_ref and any(r is None for r in out["ref"]):
        raise ValueError(f"{rows.source}: ref log-probs are present for some rows only")
    return Tokenized(
        prompt=Ragged.from_lists(out["prompt"]),
        completions=tuple(Ragged.from_lists([c[j] for c in out["comp"]]) for j in range(k)),
        example_id=np.asarray(out["id"], np.int64),
        ref_logps=np.asarray(out["ref"], np.float32) if has_ref else None,
        label=np.asarray(out["label"], bool) if kind == "unpaired" else None,
        pad_id=enc.pad_id,
        report=report,
    )


def _take(it: Iterable, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def _tokenize_chunk(batch, kind, enc: Encoder, limits: Limits, report: Report, out, forms) -> None:
    """Normalise and render a chunk of rows, tokenise all its texts at once, then finish."""
    report.rows += len(batch)
    good: list[tuple[int, formats.Record, str, list[str]]] = []
    bad: list[tuple[int, BadRow]] = []  # reported in row order once the chunk is done
    for index, row in batch:
        try:
            if isinstance(row, BadRow):
                raise row
            record = formats.normalise(row, kind)
            forms.setdefault(record.conversational, index)
            if len(forms) > 1:
                for i, e in sorted(bad, key=lambda x: x[0]):  # earlier bad rows come first
                    report.bad(i, e.reason, e.detail)
                _mixed_formats(report.source, forms)
            good.append((index, record, *enc.texts(record)))
        except BadRow as e:
            bad.append((index, e))
    k = 1 if kind == "unpaired" else 2
    ids = enc.encode([t for _, _, p, cs in good for t in (p, *cs)])
    for j, (index, record, _, _) in enumerate(good):
        raw = ids[j * (k + 1) : (j + 1) * (k + 1)]
        try:
            prompt = enc.finish_prompt(list(raw[0]), record.conversational)
            comps = [enc.finish_completion(list(c)) for c in raw[1:]]
            p, cs = truncate(prompt, comps, limits, PromptCutter(enc, record, prompt))
        except BadRow as e:
            bad.append((index, e))
            continue
        report.truncation("prompt", len(prompt) - len(p))
        for part, c, c0 in zip(_parts(k), cs, comps):
            report.truncation(part, len(c0) - len(c))
        out["prompt"].append(p)
        out["comp"].append(cs)
        out["id"].append(index)
        out["ref"].append(record.ref_logps)
        out["label"].append(record.label)
    for index, e in sorted(bad, key=lambda x: x[0]):
        report.bad(index, e.reason, e.detail)


def _mixed_formats(source: str, forms: dict[bool, int]) -> None:
    first = {("conversational" if conv else "string"): row for conv, row in forms.items()}
    raise BadInputError(
        source, None, "mixed_formats",
        f"row {first['string']} is in string form and row {first['conversational']} in "
        "conversational form (lists of {role, content} messages); use one form for every row",
    )  # fmt: skip


def tokenize_records(records: Sequence[dict[str, Any]], tokenizer, **kwargs) -> Tokenized:
    """Tokenise in-memory row dicts (tests, notebooks): ``tokenize_rows`` on a list."""
    names = list(dict.fromkeys(k for r in records for k in r))
    return tokenize_rows(Rows("records", list(records), names), tokenizer, **kwargs)
