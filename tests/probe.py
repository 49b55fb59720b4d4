"""Imports each named module first, in a process of its own: `python tests/probe.py glif2.memory glif2.neuron ...`.

A helper for tests/test_repo.py. It loads torch and the third-party libraries once, then forks one child per module
(two at a time), so each child starts with none of the project's modules loaded, as a fresh interpreter would.
Prints one line per module that fails, naming the error; exits 1 if any does.
"""

import importlib
import os
import sys
import traceback

import einops  # noqa: F401  (loaded before the fork, like torch: third-party, not under test)
import numpy  # noqa: F401
import torch  # noqa: F401
import torch._dynamo  # noqa: F401
import torch._inductor.config  # noqa: F401


def child(name: str, write: int) -> None:
    try:
        importlib.import_module(name)
        message = ""
    except BaseException:  # any failure, reported through the pipe
        message = f"{name}: {traceback.format_exc(limit=3)}"
    os.write(write, message.encode())
    os._exit(0)


def main(names: list[str]) -> int:
    assert not any(m.split(".")[0] in ("glif2", "pipelines") for m in sys.modules), "the driver imported the project"
    failures, running = [], []
    for name in [*names, *[None] * 2]:
        if name is not None:
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                child(name, write)
            os.close(write)
            running.append((pid, read))
        if len(running) == 2 or (name is None and running):
            pid, read = running.pop(0)
            chunks = []
            while chunk := os.read(read, 65536):
                chunks.append(chunk)
            os.close(read)
            os.waitpid(pid, 0)
            if chunks:
                failures.append(b"".join(chunks).decode())
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
