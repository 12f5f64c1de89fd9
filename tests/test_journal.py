"""The outage journal (_journal.py): torn tails, checked contents, and a remove() that stays inside its base."""

from __future__ import annotations

from pathlib import Path

from _rest_fake import RID, URL
from steplog._journal import Journal


def test_a_torn_journal_tail_is_cut_back_on_reopen(tmp_path: Path) -> None:
    """A crash mid-append leaves a partial last line; reopening the journal cuts it; replay sees whole lines only."""
    journal = Journal.create(tmp_path, {"run_id": RID, "tracking_uri": URL})
    body = b'{"run_id":"%b","metrics":[]}' % RID.encode()
    journal.append([journal.batch_line(body, 0), journal.end_line("FINISHED", 5)])
    journal.close()
    with open(tmp_path / RID / "journal.jsonl", "ab") as f:
        f.write(b'{"op":"batch","points":3,"bo')  # the torn tail of a crashed append
    reopened = Journal.create(tmp_path, {"run_id": RID, "tracking_uri": URL})
    ops = [op["op"] for _, op in reopened.pending()]
    reopened.close()
    assert ["batch", "end"] == ops
    assert (tmp_path / RID / "journal.jsonl").read_bytes().endswith(b"\n")
    assert RID == reopened.header["run_id"]
