"""Bad-input policy and the data report (what was skipped, truncated, kept, and why).

The policy is ``"error"`` (default) or ``"skip"``. Under ``"error"`` the first bad row raises
`BadInputError` naming the file, the row index and the problem. Under ``"skip"`` the row is
dropped and counted by reason; `Report.summary()` prints the counts at the end.

Reasons (one per bad-input class); the first three concern the whole dataset and are always
an error (a row-level reason names the row, these name the source):

=========================== ===============================================================
``missing_column``          a required column is absent from the dataset
``empty_source``            the file (or split, or dataset) has no rows
``mixed_formats``           string rows and conversational rows in one dataset (the message
                            names the first row of each)
``malformed``               a line that is not valid JSON / CSV
``undecodable``             bytes that are not UTF-8 (also lone surrogates in a string)
``null``                    a required field is null (or missing from this JSON row)
``empty``                   an empty or whitespace-only string, or an empty message list
``wrong_type``              e.g. a number where text is expected, a message without role
``non_finite``              a ``ref_*_logps`` value that is NaN or infinite
``identical``               chosen and rejected are the same
``template_error``          the chat template failed or is not prefix-consistent
``unknown_role``            a message role the chat template does not know (e.g. ``usr``)
``empty_prompt``            no prompt token at all (no BOS and an empty prompt)
``prompt_too_long``         the prompt's protected tokens alone exceed the length limits
``empty_after_truncation``  the limits leave no room for at least one prompt token and one
                            token of each completion (the first completion token is always
                            predicted from a position of its own sequence)
``identical_after_truncation`` chosen and rejected become equal after truncation
=========================== ===============================================================
"""

from __future__ import annotations

import collections
import dataclasses

POLICIES = ("error", "skip")
DATASET_REASONS = ("missing_column", "empty_source", "mixed_formats")
REASONS = (
    *DATASET_REASONS,
    "malformed",
    "undecodable",
    "null",
    "empty",
    "wrong_type",
    "non_finite",
    "identical",
    "template_error",
    "unknown_role",
    "empty_prompt",
    "prompt_too_long",
    "empty_after_truncation",
    "identical_after_truncation",
)


class BadInputError(ValueError):
    """A row (or the whole dataset) that the pipeline cannot use, with where and why."""

    def __init__(self, source: str, row: int | None, reason: str, detail: str):
        self.source, self.row, self.reason, self.detail = source, row, reason, detail
        where = f"{source}: row {row}" if row is not None else source
        hint = "" if reason in DATASET_REASONS else " (set bad_input='skip' to drop such rows)"
        super().__init__(f"{where}: {reason}: {detail}{hint}")


class BadRow(Exception):
    """Raised inside row processing; turned into an error or a skip by `Report.bad`."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Report:
    """Counts gathered while loading and tokenising one dataset split."""

    source: str = ""
    policy: str = "error"
    rows: int = 0
    kept: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first few rows
    truncated: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens_dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"bad_input must be one of {POLICIES}, got {self.policy!r}")

    def bad(self, row: int | None, reason: str, detail: str) -> None:
        """Apply the policy: raise under 'error', count under 'skip'."""
        if self.policy == "error" or reason in DATASET_REASONS:
            raise BadInputError(self.source, row, reason, detail)
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    def truncation(self, part: str, dropped: int) -> None:
        """Count a row whose ``part`` (prompt/chosen/rejected/completion) lost tokens."""
        if dropped > 0:
            self.truncated[part] += 1
            self.tokens_dropped[part] += dropped

    def summary(self) -> str:
        """Human-readable summary (printed by the debug command and the trainer)."""
        lines = [f"{self.source}: {self.rows} rows read, {self.kept} kept"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n:6d}  {reason}  (e.g. rows {self.examples[reason]})")
        for part, n in sorted(self.truncated.items()):
            lines.append(
                f"  truncated {n:6d} rows' {part} ({self.tokens_dropped[part]} tokens dropped)"
            )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """JSON-friendly counts (for logs and for merging across processes)."""
        return dict(
            source=self.source,
            rows=self.rows,
            kept=self.kept,
            skipped=dict(self.skipped),
            truncated=dict(self.truncated),
            tokens_dropped=dict(self.tokens_dropped),
        )
