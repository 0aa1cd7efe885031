"""Azurite (Microsoft's Azure Storage emulator, from npm) on free ports of 127.0.0.1, for queued ingestion.

:func:`ensure_installed` installs the pinned ``azurite`` npm package once into a cache directory
(``AB_WORKER_AZURITE_DIR``, else ``~/.cache/ab-worker/azurite-<version>``); :class:`Azurite` starts it
in memory on ports the OS picks, reads the ports back from its start-up lines and stops it.

Credentials: the well-known development account ``devstoreaccount1`` and its key are public,
documented by Microsoft for the emulator, and accepted by nothing else — not a secret.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

#: 3.35.0 is the newest Azurite that runs on Node.js 20 (3.36 needs Node >= 21, 3.37 Node >= 22).
AZURITE_VERSION = "3.35.0"
DEV_ACCOUNT = "devstoreaccount1"
DEV_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

_LISTENING = re.compile(r"Azurite (Blob|Queue|Table) service is successfully listening at (http://\S+)")
_INSTALL_TIMEOUT = 600.0
_INSTALL_LOCK = threading.Lock()


class AzuriteUnavailableError(RuntimeError):
    """Node.js or npm is missing, or Azurite could not be installed or started (the message says which)."""


def node_available() -> bool:
    """True when both ``node`` and ``npm`` are on PATH."""
    return shutil.which("node") is not None and shutil.which("npm") is not None


def install_dir() -> Path:
    """Where the pinned Azurite lives: ``AB_WORKER_AZURITE_DIR`` or ``~/.cache/ab-worker/azurite-<version>``."""
    configured = os.environ.get("AB_WORKER_AZURITE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "ab-worker" / f"azurite-{AZURITE_VERSION}"


def ensure_installed(directory: Path | None = None) -> Path:
    """The Azurite executable, installing ``azurite@AZURITE_VERSION`` with npm first if needed."""
    directory = directory or install_dir()
    executable = directory / "node_modules" / ".bin" / "azurite"
    if executable.exists():
        return executable
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise AzuriteUnavailableError("Node.js is not installed: queued Kusto ingestion needs Azurite")
    with _INSTALL_LOCK:
        if executable.exists():
            return executable
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Install beside the target and rename, so an interrupted install never looks complete.
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            # The command is constants plus the resolved npm path: nothing from outside reaches it.
            completed = subprocess.run(  # noqa: S603
                [
                    npm,
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--omit=dev",
                    "--prefix",
                    str(staging),
                    f"azurite@{AZURITE_VERSION}",
                ],
                capture_output=True,
                text=True,
                timeout=_INSTALL_TIMEOUT,
                check=False,
            )
            if completed.returncode != 0:
                raise AzuriteUnavailableError(
                    f"npm install azurite@{AZURITE_VERSION} failed: {completed.stderr.strip()[-2000:]}"
                )
            if not directory.exists():
                staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not executable.exists():
        raise AzuriteUnavailableError(f"Azurite was installed but {executable} is missing")
    return executable


class Azurite:
    """A running Azurite (blob, queue, table) with in-memory storage on free 127.0.0.1 ports."""

    def __init__(self, executable: Path | None = None, start_timeout: float = 30.0) -> None:
        self._executable = executable
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[str] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._endpoints: dict[str, str] = {}
        self._output: list[str] = []
        self._ready = threading.Condition()

    def start(self) -> Self:
        """Install if needed, start, and wait until all three services listen; returns self."""
        executable = self._executable or ensure_installed()
        self._workdir = tempfile.TemporaryDirectory(prefix="azurite-")
        command = [
            str(executable),
            "--blobHost", "127.0.0.1", "--blobPort", "0",
            "--queueHost", "127.0.0.1", "--queuePort", "0",
            "--tableHost", "127.0.0.1", "--tablePort", "0",
            "--disableTelemetry", "--inMemoryPersistence", "--extentMemoryLimit", "256",
            "--skipApiVersionCheck", "--loose", "--silent",
        ]  # fmt: skip
        self._process = subprocess.Popen(  # noqa: S603 — our pinned executable, constant arguments
            command,
            cwd=self._workdir.name,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        threading.Thread(target=self._read_output, name="azurite-output", daemon=True).start()
        deadline = time.monotonic() + self._start_timeout
        with self._ready:
            while len(self._endpoints) < 3:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._process.poll() is not None:
                    output = "".join(self._output)[-2000:]
                    self.stop()
                    raise AzuriteUnavailableError(f"Azurite did not start: {output}")
                self._ready.wait(min(remaining, 0.1))
        return self

    def _read_output(self) -> None:
        process = self._process
        if process is None or process.stdout is None:
            return
        # Keep draining after start-up so a chatty Azurite never blocks on a full pipe.
        for line in process.stdout:
            with self._ready:
                self._output.append(line)
                del self._output[:-200]
                match = _LISTENING.search(line)
                if match:
                    self._endpoints[match.group(1).lower()] = match.group(2).rstrip("/")
                    self._ready.notify_all()

    def stop(self) -> None:
        """Stop Azurite (terminate, then kill after 5 s) and remove its working directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _endpoint(self, service: str) -> str:
        try:
            return f"{self._endpoints[service]}/{DEV_ACCOUNT}"
        except KeyError:
            raise RuntimeError("Azurite is not started") from None

    @property
    def blob_endpoint(self) -> str:
        """``http://127.0.0.1:PORT/devstoreaccount1``."""
        return self._endpoint("blob")

    @property
    def queue_endpoint(self) -> str:
        """``http://127.0.0.1:PORT/devstoreaccount1``."""
        return self._endpoint("queue")

    @property
    def table_endpoint(self) -> str:
        """``http://127.0.0.1:PORT/devstoreaccount1``."""
        return self._endpoint("table")

    @property
    def connection_string(self) -> str:
        """The storage connection string of the development account on these ports."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};QueueEndpoint={self.queue_endpoint};"
            f"TableEndpoint={self.table_endpoint};"
        )
