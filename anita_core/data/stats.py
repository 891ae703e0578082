"""Counts the data pipeline reports: what was read, skipped, filtered, dropped,
truncated, and how many tokens are left to train on."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List

MAX_REMEMBERED_PROBLEMS = 5


@dataclass
class DataStats:
    rows_read: int = 0            # rows taken from the sources (after --max-samples)
    skipped_bad_rows: int = 0     # malformed rows skipped (skip_bad_rows=True)
    filtered_by_source: int = 0   # DPO rows whose source is excluded
    dropped_too_long: int = 0     # prompt alone fills max length: no answer token fits
    truncated: int = 0            # kept, but cut to the max length
    identical_pairs: int = 0      # DPO pairs whose chosen and rejected tokens are the same
    examples: int = 0             # documents (SFT) or pairs (DPO) kept
    train_examples: int = 0
    eval_examples: int = 0
    tokens: int = 0               # tokens in the kept examples (chosen + rejected for DPO)
    target_tokens: int = 0        # tokens that are a prediction target
    bad_row_examples: List[str] = field(default_factory=list)  # first few skip reasons
    identical_pair_rows: List[str] = field(default_factory=list)  # first few, "file: row N"

    def note_bad_row(self, message: str) -> None:
        self.skipped_bad_rows += 1
        if len(self.bad_row_examples) < MAX_REMEMBERED_PROBLEMS:
            self.bad_row_examples.append(message)

    def note_identical_pair(self, where: str) -> None:
        self.identical_pairs += 1
        if len(self.identical_pair_rows) < MAX_REMEMBERED_PROBLEMS:
            self.identical_pair_rows.append(where)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log."""
        parts = [f"rows read {self.rows_read}"]
        for name, value in (("skipped (malformed)", self.skipped_bad_rows),
                            ("filtered by source", self.filtered_by_source),
                            ("dropped (too long)", self.dropped_too_long),
                            ("skipped (chosen == rejected)", self.identical_pairs),
                            ("truncated", self.truncated)):
            if value:
                parts.append(f"{name} {value}")
        parts.append(f"kept {self.examples} (train {self.train_examples}, eval {self.eval_examples})")
        parts.append(f"tokens {self.tokens}, targets {self.target_tokens}")
        return "; ".join(parts)

    def nothing_usable(self, sources, what: str) -> str:
        """The one line for data of which nothing is left: the files, the counts, and the
        first skipped row's reason when rows were skipped."""
        named = ", ".join(sources) if isinstance(sources, (list, tuple)) else str(sources)
        first = f"; the first skipped: {self.bad_row_examples[0]}" if self.bad_row_examples else ""
        return f"{named}: no usable {what} ({self.summary()}){first}"

    def skipped_rows_report(self) -> str:
        """The first few skipped rows with their reasons, one per line."""
        shown = len(self.bad_row_examples)
        head = (f"skipped {self.skipped_bad_rows} malformed row(s)"
                + (f"; the first {shown}:" if shown < self.skipped_bad_rows else ":"))
        return "\n".join([head] + [f"  {m}" for m in self.bad_row_examples])
