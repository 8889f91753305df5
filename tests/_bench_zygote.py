"""A preloaded parent for the benchmark smoke runs (tests/test_bench.py).

Each smoke run used to start a fresh Python, which spent 4 s importing torch and
spectrim, and 9 s with transformers, before the script did any work: about half of the
smoke runs' time.  This process imports them once and then forks one child per request,
so every script still runs in a process of its own, as ``python SCRIPT ARGS`` from the
repository root would, with nothing left over from the scripts before it.

Protocol, one JSON object per line on stdin: ``{"path", "argv", "cwd", "log", "timeout"}``;
for each, one line ``{"code": N}`` on stdout (the child's exit status; -9 when it ran past
``timeout`` seconds and was killed).  The child's stdout and stderr go to ``log``.

The parent runs no tensor operation before it forks: a child of a process whose OpenMP
thread pool has started can hang in its first parallel region (libgomp is not fork-safe).
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import signal
import sys
import time

import torch  # noqa: F401  (preloaded for the children)

import spectrim  # noqa: F401

with contextlib.suppress(ImportError):
    import transformers  # noqa: F401
    from transformers import AutoModel  # noqa: F401  (the lazy modules most scripts use)


def _child(path: str, argv: list[str], cwd: str, log: str) -> int:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    sys.argv = [path, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # as `python path` sets it
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req["path"], req["argv"], req["cwd"], req["log"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + float(req["timeout"])
        status = None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = -9
            else:
                time.sleep(0.05)
        print(json.dumps({"code": status}), flush=True)


if __name__ == "__main__":
    main()
