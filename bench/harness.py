"""What every benchmark that runs salon as a process needs."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def salon_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Runs `salon ARGS` (e.g. `users create`, `keys create`) and returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "salon", *args], input=stdin, capture_output=True, text=True,
        env=env, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"salon {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result.stdout
