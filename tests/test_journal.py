"""The outage journal (_journal.py): torn tails, checked contents, and a remove() that stays inside its base."""

from __future__ import annotations

from pathlib import Path

import pytest

from _rest_fake import RID, URL
from steplog import StepLogError
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


def _write_journal(folder: Path, *lines: bytes) -> None:
    folder.mkdir(parents=True)
    (folder / "journal.jsonl").write_bytes(b"".join(lines))


def _header(run_id: str) -> bytes:
    return b'{"op":"run","version":1,"run_id":"%b"}\n' % run_id.encode()


@pytest.mark.parametrize("run_id", ["../victim", "<absolute>", "", "ABCDEF0123456789ABCDEF0123456789"])
def test_a_journal_is_never_created_for_a_run_id_that_is_not_mlflows(tmp_path: Path, run_id: str) -> None:
    """Journal.create refuses a run id that could name a folder outside its base, and creates nothing."""
    base = tmp_path / "journal"
    if run_id == "<absolute>":
        run_id = str(tmp_path / "victim")
    with pytest.raises(StepLogError):
        Journal.create(base, {"run_id": run_id, "tracking_uri": URL})
    assert [] == sorted(tmp_path.iterdir())


def test_remove_never_deletes_outside_the_journal_base(tmp_path: Path) -> None:
    """A journal folder that is a symlink to another folder is refused by remove(), which deletes nothing."""
    victim = tmp_path / "precious"
    _write_journal(victim, _header(RID))
    (victim / "data.bin").write_bytes(b"keep me")
    base = tmp_path / "journal"
    base.mkdir()
    (base / RID).symlink_to(victim, target_is_directory=True)
    journal = Journal.open(base / RID)
    with pytest.raises(StepLogError):
        journal.remove()
    assert b"keep me" == (victim / "data.bin").read_bytes()


def test_remove_deletes_a_journal_inside_its_base(tmp_path: Path) -> None:
    """An acknowledged journal is removed, with the base folder when it was the last journal in it."""
    journal = Journal.create(tmp_path / "journal", {"run_id": RID, "tracking_uri": URL})
    journal.remove()
    assert not (tmp_path / "journal").exists()


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"artifact","path":"../../outside.txt"}\n',
        b'{"op":"artifact","path":"/etc/passwd"}\n',
        b'{"op":"batch","points":-1,"body":{}}\n',
        b'{"op":"batch","points":1,"body":"x"}\n',
        b'{"op":"rm -rf"}\n',
        b"[1, 2]\n",
        b"not json\n",
    ],
)
def test_a_damaged_journal_line_is_a_steplog_error(tmp_path: Path, line: bytes) -> None:
    """Every line read back is checked: an artifact path leaving the journal or a malformed operation is refused."""
    _write_journal(tmp_path / RID, _header(RID), line)
    journal = Journal.open(tmp_path / RID)
    with pytest.raises(StepLogError) as info:
        list(journal.pending())
    journal.close()
    assert str(tmp_path / RID) in str(info.value)


def test_a_journal_whose_header_names_a_foreign_run_id_is_refused(tmp_path: Path) -> None:
    """A header whose run id is not MLflow's (a path) is a StepLogError when the journal is opened."""
    _write_journal(tmp_path / "j", _header("../../elsewhere"))
    with pytest.raises(StepLogError):
        Journal.open(tmp_path / "j")


def test_a_garbled_acknowledged_offset_is_refused(tmp_path: Path) -> None:
    """An 'acked' file that is not an offset inside the journal is an error, not a silent replay from 0 or a skip."""
    _write_journal(tmp_path / RID, _header(RID))
    (tmp_path / RID / "acked").write_text("99999999\n")
    journal = Journal.open(tmp_path / RID)
    with pytest.raises(StepLogError):
        journal.acked()
    journal.close()
