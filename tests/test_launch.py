"""``llava-features serve`` as a user runs it (deployments/launch.py): the one-pool commands of
docs/serving.md, run as written in two shells, and a prompt, clean stop on SIGTERM while requests are
in progress."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from deployments.launch import job_command
from tests.fixtures.markdown import blocks_of, logical_lines
from tests.fixtures.ray_cluster import AUTH_ENV_VARS, free_port

slow = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STOP_BOUND_S = 30.0
"""What the stop may take on this shared 2-core machine (measured: docs/benchmarks.md)."""


def test_job_command_names_the_pool_and_the_auth_variables():
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": "/secrets/token",
        "RAY_AUTH_TOKEN": "never-printed",
    }
    command = job_command("llava-features", "127.0.0.1:6379", env)
    assert command == (
        "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/secrets/token llava-features encode "
        "--address 127.0.0.1:6379 --serve-app llava-features"
    )
    assert (
        job_command("pool", "10.0.0.1:6379", {})
        == "llava-features encode --address 10.0.0.1:6379 --serve-app pool"
    )


def documented_one_pool_commands() -> tuple[str, str]:
    """The two commands of docs/serving.md's "One GPU pool" (the shell-1 serve and the shell-2 job)."""
    text = (REPO / "docs" / "serving.md").read_text()
    marker = text.count("\n", 0, text.index("<!-- one-pool-example -->")) + 1
    block = next(b for b in blocks_of(text, "docs/serving.md") if b.line > marker and b.shell)
    commands = [
        line for line in logical_lines(block.text) if line.strip() and not line.lstrip().startswith("#")
    ]
    serve_line, job_line = (" ".join(c.split("#", 1)[0].split()) for c in commands)
    return serve_line, job_line


def _pids_below(root: int) -> set[int]:
    """Every process started by ``root`` (its descendants), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.add(pid)
        except OSError:
            continue
    return out


@slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_documented_one_pool_commands_and_a_prompt_stop(tiny_llava, tmp_path):
    """Shell 1 runs the documented ``llava-features serve``; shell 2 runs the job command it printed
    with the documented arguments: the job goes through the endpoint's replica. Both run in a folder
    holding what the page says they find there (the README's checkpoint ``tiny`` and ``images/``), with
    only the port changed (a free one). Then SIGTERM while 8 clients send requests: every request
    sent before the signal is answered 200, the process exits 0 within STOP_BOUND_S, and the local
    Ray it started is gone."""
    serve_line, job_line = documented_one_pool_commands()
    assert serve_line == "llava-features serve --model tiny --port 8000", serve_line
    port = free_port()
    shutil.copytree(tiny_llava, tmp_path / "tiny")
    (tmp_path / "images").mkdir()
    from tests.test_serve import IMAGES

    for name, data in IMAGES.items():
        (tmp_path / "images" / name).write_bytes(data)
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))  # this cluster's own token: never the user's ~/.ray one
    env = {k: v for k, v in os.environ.items() if k not in (*AUTH_ENV_VARS, "RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_TOKEN_PATH=str(token))
    serve_cmd = serve_line.replace("--port 8000", f"--port {port}")
    proc = subprocess.Popen(  # exec: the signal goes to llava-features itself, not to the shell
        f"exec {serve_cmd}",
        shell=True,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(iter(lambda: proc.stdout.readline().decode(errors="replace"), "")),
        daemon=True,
    )
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        printed = None
        while time.monotonic() < deadline and proc.poll() is None and printed is None:
            printed = next(
                (m for line in lines if (m := re.search(r"another shell: (.*?), with the same", line))), None
            )
            time.sleep(0.5)
        assert printed is not None, "".join(lines)[-3000:]
        printed_cmd = printed.group(1)
        address = re.search(r"--address (\S+)", printed_cmd).group(1)
        # The documented shell-2 command is the printed one, plus the same --model, --input and --output.
        documented_job = job_line.replace("HOST:PORT", address)
        head = f"RAY_AUTH_MODE=token llava-features encode --address {address} --serve-app llava-features"
        assert documented_job.startswith(head + " --model tiny --input ./images --output ./features2"), (
            job_line
        )
        assert printed_cmd == head.replace("token ", f"token RAY_AUTH_TOKEN_PATH={token} "), printed_cmd
        job_cmd = printed_cmd + documented_job[len(head) :]
        fresh = {
            k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"
        }  # a fresh shell: only what it printed
        job = subprocess.run(
            job_cmd, shell=True, cwd=tmp_path, env=fresh, capture_output=True, text=True, timeout=300
        )
        assert job.returncode == 0, (job.stdout[-2000:], job.stderr[-3000:])
        assert re.search(rf"^ok:\s+{len(IMAGES)}$", job.stdout, re.MULTILINE), job.stdout[-2000:]
        stats = httpx.get(f"{url}/debug/stats", timeout=30).json()
        assert stats["offline_images"] == len(IMAGES), stats

        # SIGTERM while requests are in progress.
        below = _pids_below(proc.pid)
        assert below, "the local Ray's processes"
        stop = threading.Event()
        signalled: list[float] = []
        outcomes: list[tuple[float, object]] = []

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        outcome: object = c.post("/v1/features", content=IMAGES["a.png"]).status_code
                    except httpx.TransportError as exc:
                        outcome = type(exc).__name__
                    outcomes.append((sent, outcome))
                    if signalled and sent > signalled[0]:
                        return

        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        time.sleep(3)
        signalled.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        stopped_s = time.monotonic() - signalled[0]
        stop.set()
        for thread in clients:
            thread.join()
        before = [outcome for sent, outcome in outcomes if sent < signalled[0]]
        print(f"stopped in {stopped_s:.1f}s; {len(before)} requests sent before the signal, all answered")
        assert code == 0, "".join(lines)[-3000:]
        assert before and all(outcome == 200 for outcome in before), sorted(map(str, before))[:20]
        assert stopped_s < STOP_BOUND_S, stopped_s
        time.sleep(1)
        assert not _alive(below), f"processes of the local Ray left: {_alive(below)}"
        host, _, gcs_port = address.rpartition(":")
        with pytest.raises(OSError):
            socket.create_connection((host, int(gcs_port)), timeout=2).close()
        assert any(re.search(r"Stopped in \d+\.\ds", line) for line in lines), "".join(lines)[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
