"""Starts the server under test (the binary in $TANDEM_BIN) on a free loopback port,
waits until /health says ready, and stops it at the end. Every test that uses the
`server` fixture runs twice: against `tandem serve` (aggregated) and against
`tandem local --prefill 1 --decode 1` (the frontend in front of a prefill and a decode
worker, with prompts of 16 tokens or more prefilled remotely)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

READY_TIMEOUT_S = 180


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tandem_bin():
    path = os.environ.get("TANDEM_BIN")
    if not path:
        pytest.fail("TANDEM_BIN must point at the tandem binary (make test-python sets it)")
    if not Path(path).is_file():
        pytest.fail(f"TANDEM_BIN={path} does not exist; build it with `make build`")
    return path


def wait_for(what, check, timeout, log=lambda: ""):
    """Polls `check` until it returns something true (returned), failing after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{log()}")


class Process:
    """A child process whose output goes to a temporary file, shown when it fails."""

    def __init__(self, name, args, cwd=None):
        self.name = name
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd)

    def tail(self, lines=40):
        self.log.flush()
        self.log.seek(0)
        return f"--- {self.name} ---\n" + "".join(self.log.readlines()[-lines:])

    def alive(self):
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}\n{self.tail()}")
        return True

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Prometheus(Process):
    """The Debian `prometheus` on a free loopback port with `config` (a prometheus.yml as a
    dict), in a temporary directory removed by `stop`."""

    def __init__(self, config):
        binary = shutil.which("prometheus")
        if not binary:
            pytest.fail("prometheus is not installed: `make prometheus-tool` installs the Debian package")
        self.dir = Path(tempfile.mkdtemp(prefix="tandem-prometheus-"))
        (self.dir / "prometheus.yml").write_text(json.dumps(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        super().__init__("prometheus", [
            binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ])

        def ready():
            self.alive()
            try:
                return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for("Prometheus to be ready", ready, 60, self.tail)

    def query(self, expr):
        """An instant query's result vector."""
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def stop(self):
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Server:
    """A running `tandem serve` or `tandem local` process."""

    def __init__(self, kind="serve"):
        self.kind = kind
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # The server's output, shown when it fails to start; deleted on close.
        self.log = tempfile.TemporaryFile("w+")
        if kind == "serve":
            args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            args = ["local", "--prefill", "1", "--decode", "1", "--port", str(self.port),
                    "--remote-prefill-min-tokens", "16"]
        self.proc = subprocess.Popen([tandem_bin(), *args], stdout=self.log, stderr=subprocess.STDOUT)

    def log_tail(self, lines=40):
        self.log.flush()
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"tandem {self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"tandem {self.kind} not ready after {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    def stop(self, timeout=60):
        """SIGTERM, then wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session", params=["serve", "local"])
def server(request):
    s = Server(request.param)
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="not-needed", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model(client):
    return client.models.list().data[0].id
