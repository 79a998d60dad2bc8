"""What a takedown found and did (:class:`TakedownSummary`), and its lines for the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TakedownSummary:
    """What a takedown found and did."""

    output: str
    reason: str
    dry_run: bool
    rows_matched: int = 0  # rows (in any file) whose url or sha256 is named
    rows_newly_marked: int = 0  # embeddings/shard rows whose marks this run set
    keys: list[str] = field(default_factory=list)  # keys of the matched rows, sorted
    samples_removed: int = 0  # tar samples removed by this run
    shards_rewritten: list[str] = field(default_factory=list)  # shards with a file written
    embeddings_rewritten: list[str] = field(default_factory=list)
    report_rewritten: bool = False
    urls_not_found: list[str] = field(default_factory=list)
    sha256_not_found: list[str] = field(default_factory=list)
    orphaned_duplicates: list[str] = field(default_factory=list)  # keys dropped as duplicates of a taken-down row
    copies: list[str] = field(default_factory=list)  # keys matched only as exact copies of a named row
    blocklist_added: dict[str, int] = field(default_factory=dict)  # new entries in <output>/_blocklist/

    @property
    def changed(self) -> bool:
        return bool(self.shards_rewritten or self.embeddings_rewritten or self.report_rewritten)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}


def format_summary(s: TakedownSummary) -> str:
    """Human-readable lines for the CLI."""
    lines = [
        f"output: {s.output}{'   (dry run: nothing written)' if s.dry_run else ''}",
        f"rows matched: {s.rows_matched} ({s.rows_newly_marked} not marked before)",
        f"samples removed from tars: {s.samples_removed}",
        f"shards rewritten: {len(s.shards_rewritten)} {s.shards_rewritten if s.shards_rewritten else ''}".rstrip(),
        f"embeddings files rewritten: {len(s.embeddings_rewritten)}",
        f"report regenerated: {'yes' if s.report_rewritten else 'no'}",
    ]
    if s.dry_run:
        lines.insert(1, "(counts below are what the takedown would do)")
    if s.copies:
        lines.append(f"exact copies (same image bytes under another URL) taken down with them: {len(s.copies)}")
    if s.blocklist_added:
        added = ", ".join(f"{n} {k}" for k, n in s.blocklist_added.items())
        lines.append(f"added to the output's blocklist (later runs never store them): {added}")
    for url in s.urls_not_found:
        lines.append(f"not found: url {url}")
    for digest in s.sha256_not_found:
        lines.append(f"not found: sha256 {digest}")
    if s.orphaned_duplicates:
        lines.append(
            f"note: {len(s.orphaned_duplicates)} row(s) were dropped as duplicates of a taken-down "
            "row; re-deciding them needs the global pass (jobs/dedup.py)"
        )
    return "\n".join(lines)
