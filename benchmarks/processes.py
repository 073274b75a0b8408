"""What the benchmark scripts share: child processes that are always stopped, and which tdproxy ran.

``run.py`` and ``soak.py`` import this module from their own directory (a script's directory is
first on ``sys.path``). Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the script dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


@dataclasses.dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)


class Children:
    """Starts child processes in their own sessions and always stops them again: SIGTERM, then
    SIGKILL to the process group after ``stop_timeout`` seconds."""

    def __init__(self, stop_timeout: float, log: Callable[[str], None]) -> None:
        self._children: list[Child] = []
        self._stop_timeout = stop_timeout
        self._log = log

    def start(
        self, name: str, argv: list[str], log_path: Path, *, append: bool = False, **kwargs: Any
    ) -> Child:
        """Start ``argv`` with its output in ``log_path`` (added to it with ``append``);
        ``kwargs`` go to ``subprocess.Popen`` (``cwd``, ``env``)."""
        with log_path.open("ab" if append else "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the script only; it stops the children
                preexec_fn=die_with_parent,
                **kwargs,
            )
        child = Child(name, proc, log_path)
        self._children.append(child)
        return child

    def sessions(self) -> frozenset[int]:
        """Session ids of the children (each was started as a session leader)."""
        return frozenset(c.proc.pid for c in self._children)

    def stop_all(self) -> None:
        while self._children:
            self._stop(self._children.pop())

    def _stop(self, child: Child) -> None:
        proc = child.proc
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            self._log(f"{child.name} (pid {proc.pid}) ignored SIGTERM: killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _git(*argv: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *argv], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def tdproxy_source() -> str:
    """Which tdproxy was measured: the git commit (if any) and a hash of the package's sources."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "tdproxy").rglob("*.py")):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    commit = _git("rev-parse", "--short", "HEAD") or "no commit"
    if _git("status", "--porcelain", "--", "tdproxy"):
        commit += " + uncommitted changes"
    return f"git {commit}, sources sha256 {digest.hexdigest()[:12]}"
