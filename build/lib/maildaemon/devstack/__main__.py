"""``python -m maildaemon.devstack [STATE_DIR]``: run the dev stack until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from maildaemon.devstack.stack import DevStack
from maildaemon.errors import StartupError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maildaemon.devstack")
    parser.add_argument("state_dir", nargs="?", type=Path, default=Path(".maildaemon-dev"))
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stack = DevStack(args.state_dir)
    try:
        env = stack.start()
    except StartupError as exc:
        print(f"dev stack: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"# dev stack running in {stack.state_dir}; Ctrl-C stops it", flush=True)
        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}", flush=True)
        stop.wait()
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
