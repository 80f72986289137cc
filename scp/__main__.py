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


def _stop_early(signum: int, frame: object) -> None:
    raise _StoppedEarly(signum)


def _command(argv: list[str]) -> str:
    return next((a for a in argv[1:] if not a.startswith("-")), "")


def main() -> None:
    for s in EARLY_STOP_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(s, _stop_early)
    try:
        from scp.cli import main as cli_main

        cli_main()
    except _StoppedEarly as exc:
        signum = exc.args[0]
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
