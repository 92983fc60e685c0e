"""`cluster-model serve` stopped with SIGTERM (what a service manager sends) shuts Ray down cleanly: exit 130 with one
line, no C++ stack frames from Ray's own handler, and no Ray process of its instance left running.

A module of its own: the command starts its own Ray instance, which must not meet test_cluster's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from test_cluster import free_port
from test_server import http_ok

FIXTURE = Path(__file__).resolve().parent / "fixture" / "export"


def ray_processes() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if (b"ray" in command or b"raylet" in command) and state != "Z":
            found.add(int(pid))
    return found


def test_sigterm_stops_serve_and_its_ray_instance_cleanly(tmp_path):
    before = ray_processes()
    port = free_port()
    command = [sys.executable, "-m", "softprompt.cluster.cli", "serve", str(FIXTURE), "--port", str(port), "--replicas", "1"]
    environment = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=environment)
    try:
        deadline = time.time() + 150
        while time.time() < deadline and (http_ok(f"http://127.0.0.1:{port}/v1/models") or (0,))[0] != 200:
            assert server.poll() is None, server.communicate()[1]
            time.sleep(0.5)
        assert http_ok(f"http://127.0.0.1:{port}/v1/models")[0] == 200
        assert ray_processes() - before, "the command started no Ray processes of its own"
        server.send_signal(signal.SIGTERM)
        err = server.communicate(timeout=120)[1]
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 130, err
    assert err.rstrip().endswith("interrupted")
    assert "SIGTERM received" not in err and "logging.cc" not in err and "Traceback" not in err, err
    deadline = time.time() + 30
    while ray_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes() - before, f"Ray processes left running: {sorted(ray_processes() - before)}"
