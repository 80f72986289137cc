"""The ``sortscp`` entry point (the console script and ``python -m scp``).

A stop signal is handled from the first line on. While no command holds the
signals (the imports and the parsing of the command line, a few tenths of a
second; ``serve`` and ``sort`` take them over for their run), it ends the
process with the code the command documents for a stop, ``serve`` 0 and the
others 128 + the signal's number, and one line, not a traceback, click's
``Aborted!`` or a death by the signal.
"""

import os
import signal
import sys

#: The signals that stop a command (``scp.config.STOP_SIGNALS``, here without
#: its imports: the test suite checks that the two agree).
EARLY_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StoppedEarly(BaseException):
    """A stop signal before the command took the signals over."""


#: The signals :func:`_stop_early` took (its exception is lost if it lands in
#: a finalizer, which Python runs with exceptions printed and dropped).
_stopped: list[int] = []


def _stop_early(signum: int, frame: object) -> None:
    _stopped.append(signum)
    raise _StoppedEarly(signum)


def _command(argv: list[str]) -> str:
    return next((a for a in argv[1:] if not a.startswith("-")), "")


def _unraisable(info: "sys.UnraisableHookArgs") -> None:
    if not isinstance(info.exc_value, _StoppedEarly):  # (ours is taken: see _stopped)
        sys.__unraisablehook__(info)


def main() -> None:
    sys.unraisablehook = _unraisable
    try:
        # (inside: a signal may come while the next one is being taken)
        for s in EARLY_STOP_SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(s, _stop_early)
        from scp.cli import main as cli_main

        cli_main()
    except _StoppedEarly as exc:
        _exit_stopped(exc.args[0])
    except SystemExit:
        if _stopped:  # taken, its exception lost in a finalizer: the command went on
            _exit_stopped(_stopped[0])
        raise
    if _stopped:
        _exit_stopped(_stopped[0])


def _exit_stopped(signum: int) -> None:
    command = _command(sys.argv)
    name = signal.Signals(signum).name
    try:
        sys.stderr.write(f"{' '.join(filter(None, ['sortscp', command]))}: stopped by {name}\n")
        sys.stderr.flush()
    except Exception:  # a closed pipe: nothing more can be said
        pass
    os._exit(0 if command == "serve" else 128 + signum)


if __name__ == "__main__":  # pragma: no cover
    main()
