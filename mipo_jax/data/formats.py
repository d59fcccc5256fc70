"""TRL's dataset formats, checked row by row and normalised into `Record`.

Column conventions (TRL ``docs/source/dataset_formats.md``):

* preference, explicit prompt: ``prompt``, ``chosen``, ``rejected``;
* preference, implicit prompt: ``chosen``, ``rejected``; the prompt is their shared prefix;
* unpaired (KTO): ``prompt``, ``completion``, ``label`` (bool; True = desirable).

Each text field is either a string ("standard") or a list of ``{"role", "content"}``
messages ("conversational", rendered later with the tokenizer's chat template). Optional
precomputed reference log-probs pass through: ``ref_chosen_logps``/``ref_rejected_logps``
(preference) or ``reference_logps`` (unpaired). Other columns are ignored.

Every check raises `BadRow` with one of `report.REASONS`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mipo_jax.data.report import BadInputError, BadRow

KINDS = ("preference", "implicit_prompt", "unpaired")
REF_COLUMNS = {
    "preference": ("ref_chosen_logps", "ref_rejected_logps"),
    "implicit_prompt": ("ref_chosen_logps", "ref_rejected_logps"),
    "unpaired": ("reference_logps",),
}
_REQUIRED = {
    "preference": ("prompt", "chosen", "rejected"),
    "implicit_prompt": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}
_WORD = re.compile(r"\w")
CHAT_ROLES = ("system", "user", "assistant")
_ROLE_TESTS = (  # how templates name roles: message['role'] == 'tool', "tool" == m.role, ...
    re.compile(r"""role['"]?\]?\s*[!=]=\s*['"](\w+)['"]"""),
    re.compile(r"""['"](\w+)['"]\s*[!=]=\s*[\w.\[\]'"]*role\b"""),
)
_ROLE_IN = re.compile(r"""role['"]?\]?\s+(?:not\s+)?in\s+[\[(]([^\])]*)[\])]""")


@dataclasses.dataclass(frozen=True)
class Record:
    """One normalised row: a prompt and K completions (K=2: chosen, rejected; K=1: unpaired).

    ``prompt`` and each completion are strings, or tuples of message dicts when
    ``conversational``. ``ref_logps`` holds one summed reference log-prob per completion.
    """

    prompt: Any
    completions: tuple
    conversational: bool
    label: bool | None = None
    ref_logps: tuple[float, ...] | None = None


def detect_kind(columns: Sequence[str], kind: str = "auto", source: str = "dataset") -> str:
    """The format kind from the column names (or check an explicit one)."""
    cols = set(columns)
    if kind == "auto":
        if {"chosen", "rejected"} <= cols:
            kind = "preference" if "prompt" in cols else "implicit_prompt"
        elif {"completion", "label"} <= cols:
            kind = "unpaired"
        else:
            raise BadInputError(
                source, None, "missing_column",
                f"columns {sorted(cols)} match no TRL format: need prompt/chosen/rejected, "
                "chosen/rejected (implicit prompt) or prompt/completion/label (unpaired); "
                "rename columns with the 'columns' option",
            )  # fmt: skip
    if kind not in KINDS:
        raise ValueError(f"format must be 'auto' or one of {KINDS}, got {kind!r}")
    missing = [c for c in _REQUIRED[kind] if c not in cols]
    if missing:
        raise BadInputError(
            source, None, "missing_column",
            f"format {kind!r} needs column(s) {missing}; the dataset has {sorted(cols)}",
        )  # fmt: skip
    return kind


def text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    """A UTF-8 string field, or `BadRow`."""
    if value is None:
        raise BadRow("null", f"{field} is null or missing")
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("undecodable", f"{field} is not valid UTF-8 ({e.reason})") from None
    if not isinstance(value, str):
        raise BadRow("wrong_type", f"{field} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRow("undecodable", f"{field} holds bytes that are not UTF-8") from None
    if not allow_empty and not value.strip():
        raise BadRow("empty", f"{field} is empty")
    return value


def messages(value: Any, field: str, *, allow_empty: bool = False) -> tuple[dict, ...]:
    """A list of ``{role, content}`` messages, or `BadRow`."""
    if value is None:
        raise BadRow("null", f"{field} is null or missing")
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise BadRow(
            "wrong_type", f"{field} must be a list of messages, got {type(value).__name__}"
        )
    if not value and not allow_empty:
        raise BadRow("empty", f"{field} has no messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise BadRow("wrong_type", f"{field}[{i}] must be a {{role, content}} message")
        role = text(m["role"], f"{field}[{i}].role")
        content = text(m["content"], f"{field}[{i}].content", allow_empty=allow_empty)
        out.append({"role": role, "content": content})
    return tuple(out)


def _number(value: Any, field: str) -> float:
    if value is None:
        raise BadRow("null", f"{field} is null or missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow("wrong_type", f"{field} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise BadRow("non_finite", f"{field} is {value}")
    return float(value)


def _label(value: Any) -> bool:
    if value is None:
        raise BadRow("null", "label is null or missing")
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise BadRow("wrong_type", f"label must be a bool, got {value!r}")


def template_roles(template: str | None) -> tuple[str, ...]:
    """The message roles a chat template knows: system, user, assistant and any it names.

    A template names a role by comparing it (``message['role'] == 'tool'``,
    ``message.role in ['ipython', 'tool']``); generic templates (ChatML) write any role, so
    a typo such as ``usr`` would be rendered silently: roles outside this set are bad input.
    """
    found = dict.fromkeys(CHAT_ROLES)
    for source in template.values() if isinstance(template, Mapping) else [template or ""]:
        for pattern in _ROLE_TESTS:
            found.update(dict.fromkeys(pattern.findall(source)))
        for group in _ROLE_IN.findall(source):
            found.update(dict.fromkeys(re.findall(r"""['"](\w+)['"]""", group)))
    return tuple(found)


def check_roles(fields: Sequence[tuple[str, Sequence[Mapping]]], known: Sequence[str]) -> None:
    """`BadRow` ``unknown_role`` for the first message whose role is not in ``known``."""
    for field, msgs in fields:
        for i, m in enumerate(msgs):
            if m["role"] not in known:
                raise BadRow(
                    "unknown_role",
                    f"{field}[{i}].role is {m['role']!r}; the chat template knows {list(known)}",
                )


def split_text_prefix(a: str, b: str) -> tuple[str, str, str]:
    """(prompt, a_rest, b_rest): the shared prefix, never cutting inside a word.

    Like TRL's ``extract_prompt`` the whitespace before the first differing word goes to
    the completions; unlike it, a shared partial word ("f" of "forty"/"fifty") stays in
    the completions, so each completion tokenises as it would after the prompt.
    """
    n, m = 0, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    if n == m:  # one is a prefix of the other: leave at least one character to each
        n = max(n - 1, 0)
    while n > 0 and _WORD.match(a[n - 1]) and _WORD.match(a[n]):
        n -= 1  # back to the start of the word
    while n > 0 and a[n - 1].isspace():
        n -= 1  # the space belongs to the completions
    return a[:n], a[n:], b[n:]


def split_message_prefix(a: tuple, b: tuple) -> tuple[tuple, tuple, tuple]:
    """(prompt, a_rest, b_rest): the shared leading messages."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n], a[n:], b[n:]


def normalise(row: Mapping[str, Any], kind: str) -> Record:
    """Check one raw row and turn it into a `Record` (or raise `BadRow`)."""
    first = row.get("completion" if kind == "unpaired" else "chosen")
    conv = isinstance(first, Sequence) and not isinstance(first, str | bytes)
    field = messages if conv else text
    if kind == "unpaired":
        prompt = field(row.get("prompt"), "prompt", allow_empty=True)
        completions = (field(row.get("completion"), "completion"),)
        label = _label(row.get("label"))
    else:
        chosen, rejected = (
            field(row.get("chosen"), "chosen"),
            field(row.get("rejected"), "rejected"),
        )
        if chosen == rejected:
            raise BadRow("identical", "chosen and rejected are identical")
        if kind == "preference":
            prompt = field(row.get("prompt"), "prompt", allow_empty=True)
        else:
            split = split_message_prefix if conv else split_text_prefix
            prompt, chosen, rejected = split(chosen, rejected)
            if not chosen or not rejected:
                raise BadRow("identical", "one completion is the other's prefix in messages")
            if not conv and not (chosen.strip() and rejected.strip()):
                raise BadRow("empty", "a completion is empty once the shared prompt is removed")
        completions, label = (chosen, rejected), None
    ref = None
    ref_cols = REF_COLUMNS[kind]
    if any(c in row for c in ref_cols):
        ref = tuple(_number(row.get(c), c) for c in ref_cols)
    return Record(prompt, completions, conv, label, ref)
