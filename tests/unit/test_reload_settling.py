"""When the config watcher hands a changed file over: only once it has settled."""

from __future__ import annotations

from tdproxy.controlplane.reload import FileSettling, Snapshot

START = ("/etc/td.yaml", 1, 100, 1_000)
HALF = ("/etc/td.yaml", 1, 50, 2_000)
FULL = ("/etc/td.yaml", 1, 120, 3_000)


def look(identity: tuple[object, ...], text: str = "text") -> Snapshot:
    return Snapshot(identity, f"hash of {text}", text)


def test_an_unmoved_file_needs_no_read() -> None:
    settling = FileSettling(START)
    assert not settling.moved(START)
    assert settling.moved(FULL)


def test_a_change_is_handed_over_once_it_has_stayed_for_the_settling_time() -> None:
    settling = FileSettling(START, settle=1.0)
    assert settling.observe(look(FULL), 10.0) is None  # first seen: a candidate
    assert settling.moved(FULL)  # keeps being read while it settles
    assert settling.observe(look(FULL), 10.6) is None
    handed = settling.observe(look(FULL), 11.0)
    assert handed is not None and handed.text == "text"
    assert not settling.moved(FULL)  # handed over: nothing to do until it moves again


def test_a_file_that_keeps_changing_is_never_handed_over_half() -> None:
    settling = FileSettling(START, settle=1.0)
    assert settling.observe(look(HALF, "half"), 10.0) is None
    assert settling.observe(look(FULL, "full"), 10.8) is None  # moved: the wait starts over
    assert settling.observe(look(FULL, "full"), 11.2) is None
    handed = settling.observe(look(FULL, "full"), 11.8)
    assert handed is not None and handed.text == "full"


def test_same_size_and_mtime_but_new_content_starts_over() -> None:
    settling = FileSettling(START, settle=1.0)
    settling.observe(look(FULL, "one"), 10.0)
    assert settling.observe(look(FULL, "two"), 11.5) is None  # coarse mtime: the hash tells
    assert settling.observe(look(FULL, "two"), 12.5) is not None


def test_a_missing_file_forgets_the_candidate() -> None:
    settling = FileSettling(START, settle=1.0)
    settling.observe(look(FULL), 10.0)
    settling.missing()
    assert not settling.moved(None)
    assert settling.observe(look(FULL), 12.0) is None  # back: it settles afresh
    assert settling.observe(look(FULL), 13.0) is not None
