"""`autopeft ui`: MLflow's own server on a study's tracking store, bound to 127.0.0.1 only.

We start the real `mlflow server` rather than serving anything ourselves: the runs, the charts and the Pareto
report artifact are all MLflow's to show. Binding to 127.0.0.1 keeps a study's configs and paths off the
network; a shared server is MLflow's business (`--tracking-uri http://...` just prints where it is).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from autopeft.errors import UserError
from autopeft.tracking import default_artifact_root, default_tracking_uri, mask_url

HOST = "127.0.0.1"
DEFAULT_PORT = 5000  # MLflow's own default, so its docs and habits apply unchanged
READY_TIMEOUT_S = 120.0


def store_of(out: str | None, tracking_uri: str | None) -> tuple[str, Path | None]:
    """The backend store URI and (embedded store only) the artifact folder, or a one-line UserError."""
    if tracking_uri:
        return tracking_uri, None
    db = Path(out or "autopeft-runs") / "mlflow.db"
    if not db.is_file():
        raise UserError(f"no MLflow store at {db}; pass --out DIR of an earlier `autopeft search`, "
                        "or --tracking-uri URI")
    return default_tracking_uri(db.parent), default_artifact_root(db.parent)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the OS has just handed out (tests, and `--port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def server_command(store: str, artifacts: Path | None, port: int) -> list[str]:
    """`mlflow server` on `store`; with the embedded store, artifacts are served from `OUT/artifacts/mlflow`."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
           "--backend-store-uri", store, "--workers", "1"]
    if artifacts is not None:
        cmd += ["--artifacts-destination", str(artifacts)]
    return cmd


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path | None, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `/health` until the server answers; a server that exits or never answers is a clear error."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path else []
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}: {' '.join(tail)[:300]}"
                               + (f" (log: {log_path})" if log_path else ""))
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow server did not answer at {url} within {timeout:.0f}s")


def start_server(store: str, artifacts: Path | None, port: int, log: IO[bytes] | None = None,
                 log_path: Path | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` and wait until it is ready; returns the process and its URL. Used by tests too."""
    if port == 0:
        port = free_port()
    elif not port_free(port):
        raise UserError(f"port {port} on {HOST} is in use; pass --port P (another `autopeft ui` may be running)")
    url = f"http://{HOST}:{port}"
    # MLflow's background job runner (GenAI judges, a dozen worker processes) has nothing to do for a study
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    proc = subprocess.Popen(server_command(store, artifacts, port), stdout=log or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        wait_ready(proc, url, log_path)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server and its workers: it runs in its own process group, so the group goes together,
    and whatever of the group outlives a polite SIGTERM by 10 s is killed."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def ui_command(out: str | None = None, tracking_uri: str | None = None, port: int = DEFAULT_PORT) -> None:
    """`autopeft ui`: serve the study's MLflow store on 127.0.0.1 until Ctrl+C."""
    if out and tracking_uri:
        raise UserError("pass --out DIR or --tracking-uri URI, not both")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: give a port between 1 and 65535")
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow is already served at {mask_url(tracking_uri)}; open it in a browser")
        return
    store, artifacts = store_of(out, tracking_uri)
    # the server's own log: beside the study, or (a store given by URI) in the temp folder
    log_dir = artifacts.parent.parent if artifacts else Path(tempfile.gettempdir())
    log_path = log_dir / "mlflow-ui.log"
    with open(log_path, "ab") as log:
        proc, url = start_server(store, artifacts, port, log, log_path)
        print(f"MLflow UI for {mask_url(store)}: {url}  (server log: {log_path}; Ctrl+C stops it)", flush=True)
        # SIGTERM (a service manager, a test) stops the server as Ctrl+C does, instead of orphaning it
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_server(proc)
