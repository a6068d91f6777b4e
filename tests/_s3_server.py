"""A local S3 server for the tests: moto's server mode on 127.0.0.1, a free port, stopped by its PID."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


class S3Server:
    """``python -m moto.server`` started on a free port of 127.0.0.1; :meth:`stop` ends it by its PID."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.pid = self._process.pid
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server on port {self.port} did not start") from None
                time.sleep(0.1)
        # Credentials the AWS SDK accepts, and empty config files so that it finds nothing else.
        self._config = tempfile.NamedTemporaryFile(prefix="asyncckpt-aws-", delete=False)
        self._config.close()
        self.environment = {
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_CONFIG_FILE": self._config.name,
            "AWS_SHARED_CREDENTIALS_FILE": self._config.name, "AWS_EC2_METADATA_DISABLED": "true",
        }

    def new_bucket(self) -> str:
        """A fresh, empty bucket's name."""
        name = f"bucket-{secrets.token_hex(6)}"
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/{name}", method="PUT"), timeout=10).close()
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every key in ``bucket`` (ListObjectsV2, first 1,000)."""
        with urllib.request.urlopen(f"{self.endpoint}/{bucket}?list-type=2", timeout=10) as response:
            body = response.read().decode()
        return sorted(part.split("</Key>")[0] for part in body.split("<Key>")[1:])

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self._process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self._process.wait(10)
        os.unlink(self._config.name)
