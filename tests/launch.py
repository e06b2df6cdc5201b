"""Two CPU processes started by torchrun, as a user's launcher would start them (tests that train
or run the CLI on several processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def two_processes(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node 2 ARGS`` (a script and its arguments, or ``-m module ...``)
    on a free port of its own (tests run side by side), one thread each; its output captured."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
