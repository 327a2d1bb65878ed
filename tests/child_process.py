"""A child process for tests that fails fast: waiting on it gives up as soon as it exits, with
its stderr in the message, instead of waiting out a long timeout for output that never comes."""

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable


class Child:
    """``subprocess.Popen(args)`` with stderr kept in a temporary file (readable at any time), in
    a process group of its own: closing it kills what it started too (a vLLM server's engine
    processes outlive a killed server otherwise)."""

    def __init__(self, args: list[str], **options) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self._stderr, text=True,
                                        start_new_session=True, **options)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
        """Poll ``condition`` until it holds; fail at once if the child exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            code = self.process.poll()
            if code is not None:
                raise AssertionError(f"the child exited ({code}) before {what}:\n{self.stderr()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.stderr()[-4000:]}")
            time.sleep(0.01)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the child alone (what it started is its to stop); its exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def group_alive(self, grace: float = 10) -> bool:
        """Whether a process of the child's group is still running ``grace`` seconds on."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return False
            time.sleep(0.1)
        return True

    def close(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # the whole group has exited already
            pass
        self.process.wait()
        self._stderr.close()

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
