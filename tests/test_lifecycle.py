"""A run's states and the one status parser (``_lifecycle.py``)."""

from __future__ import annotations

import pytest

from steplog import InvalidValueError, RunStatus
from steplog._lifecycle import END_STATUSES, RunState, exit_status, parse_status


@pytest.mark.parametrize(
    ("given", "expected"),
    [("FINISHED", RunStatus.FINISHED), ("failed", RunStatus.FAILED), ("Killed", RunStatus.KILLED)],
)
def test_status_names_are_read_in_any_case(given: str, expected: RunStatus) -> None:
    """A status name in any case, or a RunStatus, is the RunStatus it names."""
    assert expected == parse_status(given) == parse_status(expected)


@pytest.mark.parametrize("bad", ["DONE", " FINISHED", "3", 3, None, RunStatus.RUNNING])
def test_anything_else_is_refused_naming_the_choices(bad: object) -> None:
    """A status that is not among the allowed ones is an InvalidValueError listing them."""
    with pytest.raises(InvalidValueError, match="use one of FINISHED, FAILED, KILLED"):
        parse_status(bad, END_STATUSES)  # type: ignore[arg-type]


def test_states_move_only_forward() -> None:
    """new -> running -> closing -> closed (or new -> closing); any other move is a steplog bug, caught at once."""
    assert RunState.RUNNING is RunState.NEW.check_transition(RunState.RUNNING)
    assert RunState.CLOSING is RunState.NEW.check_transition(RunState.CLOSING)
    assert RunState.CLOSED is RunState.CLOSING.check_transition(RunState.CLOSED)
    for state, new in [
        (RunState.CLOSING, RunState.RUNNING),
        (RunState.CLOSED, RunState.RUNNING),
        (RunState.RUNNING, RunState.NEW),
        (RunState.RUNNING, RunState.CLOSED),
    ]:
        with pytest.raises(AssertionError, match=f"from {state.value} to {new.value}"):
            state.check_transition(new)


@pytest.mark.parametrize(
    ("exc", "signalled", "expected"),
    [
        (None, False, RunStatus.FINISHED),
        (ValueError("x"), False, RunStatus.FAILED),
        (SystemExit(0), False, RunStatus.FINISHED),
        (SystemExit(2), False, RunStatus.FAILED),
        (KeyboardInterrupt(), False, RunStatus.KILLED),
        (None, True, RunStatus.KILLED),
        (ValueError("x"), True, RunStatus.KILLED),
    ],
)
def test_exit_status(exc: BaseException | None, signalled: bool, expected: RunStatus) -> None:
    """How a context exits decides the status: normal FINISHED, an error FAILED, an interrupt or signal KILLED."""
    assert expected == exit_status(None if exc is None else type(exc), exc, signalled=signalled)
