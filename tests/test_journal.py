"""The deployment journal on disk: every outcome kept, and a size that does not grow for ever."""

from __future__ import annotations

from pathlib import Path

from agent.deploy.journal import KEEP_UNVERIFIED, Journal


def test_the_journal_keeps_one_line_per_id_and_drops_only_the_oldest_unverified_rejections(tmp_path: Path):
    path = tmp_path / "deployments.jsonl"
    j = Journal(path)
    for i in range(40):  # real deployments, each through its states
        for state in ("received", "downloading", "verifying", "validating", "activating", "active"):
            j.record(f"model-{i}", state)
    for i in range(3 * KEEP_UNVERIFIED):  # a flood of junk, each rejected by its own hash
        j.record(f"payload-{i:016x}", "rejected", "manifest is not valid JSON")
    reopened = Journal(path)
    lines = path.read_text().splitlines()
    assert len(lines) <= 40 + KEEP_UNVERIFIED + 5000  # compacted, not 40 * 6 + 3000 lines and growing
    assert all(reopened.finished(f"model-{i}") for i in range(40))  # a real id is never forgotten
    assert reopened.finished(f"payload-{3 * KEEP_UNVERIFIED - 1:016x}")  # the newest junk still known
    assert not reopened.finished("payload-0000000000000000")  # the oldest let go
    assert len(Journal(path).latest(1000)) <= 40 + KEEP_UNVERIFIED
