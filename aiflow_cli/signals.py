"""Signals and child processes: a command exits within 2 s of SIGINT or SIGTERM, with exit code 128 + the signal
(130, 143), and leaves no process behind.

- :func:`install` (the CLI's entry point calls it) makes SIGTERM behave like Ctrl-C: both raise
  ``KeyboardInterrupt`` in the main thread, so ``with`` blocks close their servers and emulators as they unwind,
  and :func:`received` tells the entry point which exit code to use. A second signal does not interrupt that
  clean-up again.
- The main thread only sees the exception when it next runs Python code; a call into the Rust core or torch can
  keep it away for longer. So a watchdog thread, woken by the signal itself (``signal.set_wakeup_fd``), sends
  SIGTERM to every child started through :func:`spawn` at once and, if the process is still running
  :data:`GRACE_S` later, SIGKILLs them and exits.
- :func:`die_with_parent`, called first thing in a child, has Linux SIGKILL the child when its parent dies, even
  by SIGKILL (``PR_SET_PDEATHSIG``), and closes the race where the parent died before the call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

#: Seconds between the signal and the forced exit, if the clean-up has not finished by then. Leaves most of the
#: 2 s for the exit itself, which took up to 0.8 s for `aiflow demo` on a loaded 2-core machine (tests/test_signals.py).
GRACE_S = 0.5
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: ``prctl`` option numbers from <linux/prctl.h>.
_PR_SET_PDEATHSIG = 1

_lock = threading.Lock()
_children: dict[int, subprocess.Popen[Any]] = {}
_received: Optional[int] = None
_spawner: Optional[ThreadPoolExecutor] = None


def received() -> Optional[int]:
    """The first SIGINT/SIGTERM this process received (None: none)."""
    return _received


def record(signum: int) -> None:
    """Notes ``signum`` as received (the first one counts): for handlers installed elsewhere, such as a server's."""
    global _received
    with _lock:
        if _received is None:
            _received = signum


def exit_code(default: int = 130) -> int:
    """128 + the received signal (130 for SIGINT, 143 for SIGTERM); ``default`` if none was received."""
    return 128 + _received if _received is not None else default


def _raise_interrupt(signum: int, frame: object) -> None:
    first = _received is None
    record(signum)
    if first:  # a second Ctrl-C must not break the clean-up the first one started; the watchdog bounds it
        raise KeyboardInterrupt


def install() -> None:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt`` in the main thread; a watchdog bounds the clean-up to
    :data:`GRACE_S`. Call once, from the main thread (the CLI's entry point does)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for s in SIGNALS:
        signal.signal(s, _raise_interrupt)
    threading.Thread(target=_watchdog, args=(r,), name="aiflow-signal-watchdog", daemon=True).start()


def _watchdog(fd: int) -> None:
    while True:
        data = os.read(fd, 64)
        sigs = [b for b in data if b in SIGNALS]
        if sigs:
            break
    record(sigs[0])
    signal_children(signal.SIGTERM)
    threading.Event().wait(GRACE_S)
    # Still here: the main thread is stuck (in native code, or a clean-up that hangs).
    signal_children(signal.SIGKILL)
    try:
        os.write(2, f"\ninterrupted: forced exit {GRACE_S} s after {signal.Signals(sigs[0]).name}\n".encode())
    finally:
        os._exit(exit_code())


def exit_now() -> None:
    """Exits with :func:`exit_code` without the interpreter's slow teardown (after a signal, time counts)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe must not turn an interrupt into a traceback
            pass
    signal_children(signal.SIGKILL)
    os._exit(exit_code())


# ---- children ------------------------------------------------------------------------------------------------


def spawn(argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **popen_kw)``, tracked so a signal reaches the child at once.

    The child should call :func:`die_with_parent` first. Linux sends the parent-death signal when the *thread*
    that forked the child ends, not the process: so children are forked from the main thread or from one
    spawner thread that lives as long as the process, never from a short-lived worker thread."""
    global _spawner
    if threading.current_thread() is threading.main_thread():
        proc = subprocess.Popen(list(argv), **popen_kw)
    else:
        with _lock:
            if _spawner is None:
                _spawner = ThreadPoolExecutor(1, thread_name_prefix="aiflow-spawner")
        proc = _spawner.submit(lambda: subprocess.Popen(list(argv), **popen_kw)).result()
    with _lock:
        _children[proc.pid] = proc
    return proc


def forget(proc: subprocess.Popen[Any]) -> None:
    """Stops tracking ``proc`` (it has been reaped)."""
    with _lock:
        _children.pop(proc.pid, None)


def signal_children(signum: int) -> None:
    """Sends ``signum`` to every tracked child that is still running."""
    with _lock:
        procs = list(_children.values())
    for p in procs:
        if p.returncode is None:
            try:
                p.send_signal(signum)
            except OSError:
                pass


def die_with_parent(expected_ppid: int) -> None:
    """In a child: be SIGKILLed when the parent dies (Linux; elsewhere a no-op). If the parent is already gone
    (it died before this call: the child was re-parented), exit at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_ppid:
        os._exit(1)


__all__ = [
    "GRACE_S",
    "install",
    "received",
    "record",
    "exit_code",
    "exit_now",
    "spawn",
    "forget",
    "signal_children",
    "die_with_parent",
]
