"""`llm-gateway demo` on free ports: the printed curl line and openai snippet work; SIGTERM leaves nothing."""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import REPO, free_port
from tests.test_sidecar_support import processes_with, wait_for

pytestmark = pytest.mark.timeout(120)


def test_demo_prints_working_snippets_and_stops_cleanly(tmp_path: Path, model: str) -> None:
    port, admin_port, status_port = free_port(), free_port(), free_port()
    out_path = tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--port",
                str(port),
                "--admin-port",
                str(admin_port),
                "--status-port",
                str(status_port),
                "--model",
                model,
                "--instant",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in out_path.read_text() and time.monotonic() < deadline:
            assert demo.poll() is None, out_path.read_text()
            time.sleep(0.1)
        text = out_path.read_text()
        assert f"3 simulated vLLM engines serving {model!r}" in text, text
        curl_line = next(line for line in text.splitlines() if line.startswith("curl "))
        assert f"http://127.0.0.1:{port}/v1/chat/completions" in curl_line
        if shutil.which("curl"):
            answer = subprocess.run(shlex.split(curl_line), capture_output=True, text=True, timeout=30)
            assert answer.returncode == 0 and '"choices"' in answer.stdout, answer
        snippet = text.split("python - <<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
        reply = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
        assert len(processes_with(f"--model {model} --id")) == 3
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "sidecar",
                "status",
                "--url",
                f"http://127.0.0.1:{status_port}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert status.stdout.count("  running  ") == 3, status.stdout
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=60)
    assert code == 0, out_path.read_text()
    assert "llm-gateway demo: stopped" in out_path.read_text()
    wait_for(lambda: not processes_with(model), timeout=10, what="engines stopped")
    assert not processes_with(f"127.0.0.1:{admin_port}"), "gateway left running"
