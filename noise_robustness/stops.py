"""How a command stops: SIGTERM (a scheduler's time limit) and SIGINT (Ctrl-C) noted for the time of one command, and
what to tell the user to resume it."""

import signal
import threading

from pytorch_lightning.utilities.exceptions import SIGTERMException

# How a command stopped by a signal (or a full disk) is resumed, by subcommand.
RESUME = {
    "sweep": "rerun the same command to resume the study from its last finished epoch",
    "fit": "rerun it with --ckpt_path last to resume from its last finished epoch",
    "certify": "rerun the same command to resume the certification from its last saved image",
    "attack": "rerun the same command to resume the attack after its last written attack",
}


def how_to_resume(subcommand: str | None) -> str:
    return RESUME.get(subcommand, "run it again")


class StopSignals:
    """SIGTERM and SIGINT, noted and turned into exceptions for the time of one command.

    Outside a Lightning run, SIGTERM raises ``SIGTERMException`` at once and SIGINT ``KeyboardInterrupt``.
    Inside one, Lightning's own SIGTERM handler stops the run at its next step (it calls this one too),
    and Lightning turns a ``KeyboardInterrupt`` into a graceful shutdown.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGTERM and signal.getsignal(signum) != self.handle:
            return  # called by Lightning's handler: the run stops at its next step
        raise SIGTERMException() if signum == signal.SIGTERM else KeyboardInterrupt()
