"""The locustfile works end to end: a 10-second headless locust run against `llm-gateway demo`.

What a user of `loadtests/locustfile.py` relies on: every kind of user gets answers through the
gateway without failures, and streamed requests report time-to-first-token as their own statistic.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.procs import REPO, free_port, http_get, spawn

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"


def wait_serving(url: str, timeout: float = 30.0) -> None:
    """Until the demo's gateway lists a model and answers a chat with it (engines registered)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, body = http_get(url + "/v1/models")
            models = json.loads(body).get("data") or [] if status == 200 else []
            if models:
                chat = json.dumps({"model": models[0]["id"], "messages": [{"role": "user", "content": "hi"}]})
                req = urllib.request.Request(
                    url + "/v1/chat/completions",
                    data=chat.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            last = (status, body[:200])
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"the demo did not serve a chat within {timeout}s (last: {last})")


def run_locust(
    host: str, workdir: Path
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, str]]]:
    prefix = workdir / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "8", "-r", "8"]
    cmd += ["-t", "10s", "--host", host, "--csv", str(prefix), "--only-summary", "--stop-timeout", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=workdir, check=False)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {f"{row['Type']} {row['Name']}": row for row in csv.DictReader(f)}
    return done, rows


def test_locust_against_the_demo(tmp_path: Path) -> None:
    port, admin, status = free_port(), free_port(), free_port()
    demo_args = ["demo", "--instant", "--port", str(port), "--admin-port", str(admin)]
    demo_args += ["--status-port", str(status), "--state-dir", str(tmp_path / "state")]
    with spawn(demo_args, port=port, ready_path="/v1/models", log_dir=tmp_path, timeout=60) as demo:
        wait_serving(demo.url)
        done, rows = run_locust(demo.url, tmp_path)
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"locust failed (exit {done.returncode}):\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]

    for name in ("POST chat short", "POST chat (stream)", "POST chat shared-prefix (stream)"):
        assert name in rows, f"no {name!r} requests were made: {sorted(rows)}"
        assert int(rows[name]["Request Count"]) > 0
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
    ttft = rows["SSE TTFT"]
    assert int(ttft["Request Count"]) > 0 and int(ttft["Failure Count"]) == 0
    assert float(ttft["Median Response Time"]) >= 0
    assert int(rows["SSE stream total"]["Request Count"]) > 0
    assert int(rows[" Aggregated"]["Failure Count"]) == 0
