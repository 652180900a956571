"""What every benchmark that runs salon as a process needs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
# The admin every benchmark makes in its fresh salon, for an API key.
USERNAME = "bench"
PASSWORD = "bench-password-123"

T = TypeVar("T")


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


def make_workdir(name: str) -> tuple[Path, Path]:
    """A fresh temp dir for one run (`salon-bench-NAME-…`) and the `logs` folder in it,
    where `spawn` puts each process's output."""
    path = Path(tempfile.mkdtemp(prefix=f"salon-bench-{name}-"))
    logs = path / "logs"
    logs.mkdir()
    return path, logs


# -- processes ---------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def cpu_s(self) -> float:
        """User + system CPU seconds this process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        """SIGTERM this process (by its PID), SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def spawn(name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> Proc:
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv), env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Proc(name, process, log_path)


def wait_http(proc: Proc, url: str, timeout_s: float = 60.0) -> float:
    """Polls `url` until it answers (any HTTP status); returns the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - started
        except urllib.error.HTTPError:
            return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited {proc.process.returncode}:\n{proc.log_tail()}")
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"{proc.name} did not answer in {timeout_s} s:\n{proc.log_tail()}")
        time.sleep(0.05)


def _answering(proc: Proc, url: str) -> float:
    """`wait_http`, stopping the process if it never answers: the caller gets no `Proc`
    to stop then."""
    try:
        return wait_http(proc, url)
    except BaseException:
        proc.stop()
        raise


class Served(NamedTuple):
    proc: Proc
    url: str  # http://127.0.0.1:PORT, no path
    ready_s: float  # from spawning it until it answered


def start_upstream(logs: Path, *options: str) -> Served:
    """The mock upstream (`salon.backends.mock_upstream OPTIONS`, e.g. `--chunks 20`) on a
    free port, answering; its URL ends in /v1, as a provider's base URL does."""
    port = free_port()
    argv = [sys.executable, "-m", "salon.backends.mock_upstream", "--port", str(port), *options]
    proc = spawn("upstream", argv, dict(os.environ), logs)
    url = f"http://127.0.0.1:{port}/v1"
    return Served(proc, url, _answering(proc, f"{url}/models"))


def salon_env(data_dir: Path, upstream_url: str) -> dict[str, str]:
    """salon's settings for a run: its own data dir, the model `up:mock` at the mock
    upstream, and none of this shell's SALON_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALON_")}
    env.update(
        {
            "SALON_DATA_DIR": str(data_dir),
            "SALON_MODELS": "up:mock",
            "SALON_PROVIDERS__UP__KIND": "openai",
            "SALON_PROVIDERS__UP__BASE_URL": upstream_url,
            "SALON_LOG_LEVEL": "warning",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def admin_key(env: dict[str, str], username: str = USERNAME, password: str = PASSWORD) -> str:
    """Makes an admin in the salon of `env` with the CLI; returns a new API key of theirs."""
    salon_cli(env, "users", "create", username, "--admin", stdin=password)
    return salon_cli(env, "keys", "create", username).strip().splitlines()[-1]


def serve_salon(env: dict[str, str], logs: Path, name: str = "salon") -> Served:
    """`salon serve` (one worker) on a free port, answering."""
    port = free_port()
    argv = [sys.executable, "-m", "salon", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn(name, argv, env, logs)
    url = f"http://127.0.0.1:{port}"
    return Served(proc, url, _answering(proc, f"{url}/api/auth/state"))


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs a load generator on uvloop where it is installed (a cheaper client leaves more
    of the machine to the servers it measures), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
