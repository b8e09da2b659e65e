"""Authenticated network access: CURVE on tcp://, file permissions on ipc://, refusals at start.

One real daemon (a subprocess) with CURVE on a free loopback port and an ipc endpoint; real
keys from `voiced keygen`; real clients. Its engine is the tests' weightless one: nothing here
is about the voice, and Kokoro would only add its loading time.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from voiced.client import Client, Unreachable
from voiced.config import load_config
from voiced.errors import ConfigError, VoicedError
from voiced.security import is_loopback, prepare_ipc
from voiced.testing import DaemonProcess, free_port

from fakes import FAKE_ENGINES

# A client that cannot get in is told why as soon as ZeroMQ knows, long before its timeout
# (the default 60 s, which stands for requests a daemon accepted).
LONG_WAIT_S = 60.0


def voiced(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voiced", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=120,
    )


def keygen(name: str, folder: Path) -> tuple[Path, Path]:
    result = voiced("keygen", name, "--dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert f"{name}.key_secret" in result.stdout and "curve_secret_key" in result.stdout
    return folder / f"{name}.key", folder / f"{name}.key_secret"


class Secured(DaemonProcess):
    """The daemon with CURVE on tcp and an ipc socket in a folder it creates."""

    def __init__(self, root: Path) -> None:
        keys = root / "keys"
        self.clients = root / "clients"
        self.server_public, self.server_secret = keygen("server", keys)
        self.alice_public, self.alice_secret = keygen("alice", keys)
        self.mallory_public, self.mallory_secret = keygen("mallory", keys)
        self.bob_public, self.bob_secret = keygen("bob", keys)
        self.clients.mkdir()
        (self.clients / "alice.key").write_bytes(self.alice_public.read_bytes())
        tcp = f"tcp://127.0.0.1:{free_port()}"
        self.ipc_path = root / "run" / "voiced.sock"  # "run" does not exist: the daemon creates it
        server = {
            "endpoints": [tcp, f"ipc://{self.ipc_path}"],
            "curve_secret_key": "keys/server.key_secret",
            "curve_clients_dir": "clients",
        }
        super().__init__(root, {"server": server, "engine": {"name": "tone"}, "plugins": {"paths": [FAKE_ENGINES]}})

    def client(self, key: Path | None, **kwargs: object) -> Client:  # type: ignore[override]
        # a key the daemon does not know is refused at once; one it knows is answered within minutes anywhere
        if key is None:
            return Client(self.tcp, timeout_s=LONG_WAIT_S)
        return Client(self.tcp, timeout_s=LONG_WAIT_S, curve_server_key=self.server_public, curve_key=key)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    secured = Secured(tmp_path_factory.mktemp("secured"))
    secured.start()
    try:
        yield secured
    finally:
        code = secured.stop()
        assert code == 0, secured.log.read_text()[-3000:]


def test_allowed_client_gets_answers(daemon: Secured) -> None:
    with daemon.client(daemon.alice_secret) as client:
        assert client.ping()["protocol"] == 1
        assert client.voices() == []
    log = daemon.log.read_text()
    assert "CURVE authentication on tcp://127.0.0.1" in log


def _fails_fast(client: Client, match: str) -> None:
    # Twice: after a failed handshake ZeroMQ drops the connection for good, and a second request
    # on the same client must not block in send.
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(Unreachable, match=match):
            client.ping()
        assert time.monotonic() - started < LONG_WAIT_S / 2, "the client waited for its timeout"


def test_unknown_key_is_told_it_was_refused(daemon: Secured) -> None:
    with Client(daemon.tcp, timeout_s=LONG_WAIT_S, curve_server_key=daemon.server_public,
                curve_key=daemon.mallory_secret) as client:
        _fails_fast(client, "refused this client's key")
    with daemon.client(daemon.alice_secret) as client:  # the daemon serves on
        assert client.ping()["protocol"] == 1


def test_plain_client_is_told_to_use_curve(daemon: Secured) -> None:
    with Client(daemon.tcp, timeout_s=LONG_WAIT_S) as client:
        _fails_fast(client, "does not speak the voiced protocol without CURVE.*--server-key")


def test_request_after_a_known_refusal_fails_fast(daemon: Secured) -> None:
    # Whether ZeroMQ drops a connection whose handshake failed (and never retries) or reconnects
    # depends on which side noticed first. Once dropped, a request has nowhere to be queued; it
    # must be told why instead of blocking in send. Try until the dropped case comes up.
    for _ in range(40):
        with Client(daemon.tcp, timeout_s=LONG_WAIT_S) as client:
            deadline = time.monotonic() + LONG_WAIT_S
            while client._link.problem() is None:
                assert time.monotonic() < deadline, "the handshake never failed"
                time.sleep(0.05)
            time.sleep(0.2)
            if client._socket.poll(0, zmq.POLLOUT):
                continue  # ZeroMQ kept a queue for a reconnection: not the case under test
            _fails_fast(client, "does not speak the voiced protocol without CURVE")
            return
    pytest.skip("ZeroMQ reconnected after every failed handshake here; the dropped case never came up")


def test_client_with_the_wrong_server_key_is_told_so(daemon: Secured) -> None:
    with Client(daemon.tcp, timeout_s=LONG_WAIT_S, curve_server_key=daemon.mallory_public,
                curve_key=daemon.alice_secret) as client:
        _fails_fast(client, "CURVE handshake .* failed: is --server-key the daemon's public key")


def test_ipc_is_local_and_protected_by_permissions(daemon: Secured) -> None:
    assert stat.S_IMODE(daemon.ipc_path.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(daemon.ipc_path.stat().st_mode)
    assert stat.S_IMODE(daemon.ipc_path.parent.stat().st_mode) == 0o750
    with Client(f"ipc://{daemon.ipc_path}", timeout_s=10) as client:
        assert client.ping()["protocol"] == 1


def test_ipc_path_in_use_or_not_a_socket_is_refused(daemon: Secured, tmp_path: Path) -> None:
    """A second daemon on the first one's ipc path would take its socket; a file there would be
    deleted. Both are refused; a socket left by a dead process is taken over."""
    with pytest.raises(VoicedError, match="another process .* is listening"):
        prepare_ipc(f"ipc://{daemon.ipc_path}")
    config = write_config(tmp_path, f'endpoints = ["ipc://{daemon.ipc_path}"]')
    result = voiced("serve", "--config", str(config))
    assert result.returncode == 1 and "is listening on it" in result.stderr.strip().splitlines()[-1]
    assert "speaker encoder" not in result.stderr  # refused before any model is loaded
    # the same for a tcp port in use (the first daemon's)
    config = write_config(tmp_path, f'endpoints = ["{daemon.tcp}"]')
    result = voiced("serve", "--config", str(config))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and f"cannot bind {daemon.tcp}: the port is in use" in last, result.stderr
    assert "speaker encoder" not in result.stderr
    with Client(f"ipc://{daemon.ipc_path}", timeout_s=10) as client:  # the first one still answers
        assert client.ping()["protocol"] == 1

    kept = tmp_path / "notes.txt"
    kept.write_text("mine")
    with pytest.raises(VoicedError, match="exists and is not a socket"):
        prepare_ipc(f"ipc://{kept}")
    assert kept.read_text() == "mine"

    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens
    assert prepare_ipc(f"ipc://{stale}") == stale


def test_cli_options_and_environment(daemon: Secured) -> None:
    result = voiced("status", "--endpoint", daemon.tcp, "--server-key", str(daemon.server_public),
                    "--key", str(daemon.alice_secret), "--json", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert '"version"' in result.stdout
    result = voiced("voices", "--endpoint", daemon.tcp, "--json", "--timeout", "20",
                    env={"VOICED_SERVER_KEY": str(daemon.server_public), "VOICED_CLIENT_KEY": str(daemon.alice_secret)})
    assert result.returncode == 0, result.stderr
    result = voiced("status", "--endpoint", daemon.tcp)  # without keys: one line saying what is missing
    assert result.returncode == 1 and "without CURVE" in result.stderr and "--server-key and --key" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_sighup_rereads_the_client_keys(daemon: Secured) -> None:
    with daemon.client(daemon.bob_secret) as client:
        with pytest.raises(Unreachable, match="refused this client's key"):
            client.ping()
    (daemon.clients / "bob.key").write_bytes(daemon.bob_public.read_bytes())
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with daemon.client(daemon.bob_secret) as client:
            try:
                assert client.ping()["protocol"] == 1
                return
            except Unreachable:  # refused until the daemon has re-read the folder
                time.sleep(0.2)
    raise AssertionError("bob's key was not taken after SIGHUP:\n" + daemon.log.read_text()[-2000:])


def test_client_key_errors_are_clear(tmp_path: Path) -> None:
    import zmq.auth

    public, secret = zmq.auth.create_certificates(tmp_path, "server")
    with pytest.raises(VoicedError, match="client key .*file does not exist"):
        Client("tcp://127.0.0.1:1", curve_server_key=public, curve_key=tmp_path / "nope.key_secret")
    with pytest.raises(VoicedError, match="client key .*holds no secret key"):
        Client("tcp://127.0.0.1:1", curve_server_key=public, curve_key=public)
    with pytest.raises(VoicedError, match="server key .*not a ZeroMQ key file"):
        Client("tcp://127.0.0.1:1", curve_server_key=__file__, curve_key=secret)
    with pytest.raises(VoicedError, match="both"):
        Client("tcp://127.0.0.1:1", curve_server_key=public)


# ---------------------------------------------------------------------- refusals at start


def write_config(tmp_path: Path, server: str) -> Path:
    (tmp_path / "voices").mkdir(exist_ok=True)
    path = tmp_path / "voiced.toml"
    path.write_text(f'[voices]\ndir = "{tmp_path / "voices"}"\n[cache]\ndir = "{tmp_path / "cache"}"\n[server]\n{server}\n')
    return path


def test_network_endpoint_without_curve_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'endpoints = ["tcp://0.0.0.0:5599"]')
    for command in ("check-config", "serve"):
        result = voiced(command, "--config", str(config))
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert "curve_secret_key" in line and "allow_insecure" in line and str(config) in line, line
        assert "\n" not in line
    write_config(tmp_path, 'endpoints = ["tcp://0.0.0.0:5599"]\nallow_insecure = true')
    assert load_config(config).server.allow_insecure
    for endpoint in ("tcp://*:5599", "tcp://eth0:5599", "tcp://[::]:5599", "tcp://192.168.1.2:5599"):
        write_config(tmp_path, f'endpoints = ["{endpoint}"]')
        with pytest.raises(ConfigError, match=r"\[server\] curve_secret_key"):
            load_config(config)


def test_loopback_and_ipc_need_no_curve(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'endpoints = ["tcp://127.0.0.1:5599", "tcp://[::1]:5600", "tcp://localhost:1", '
                                    f'"ipc://{tmp_path}/s.sock"]')
    assert load_config(config).server.curve_secret_key == ""
    assert is_loopback("tcp://127.3.2.1:9") and not is_loopback("tcp://10.0.0.1:9")


def test_bad_keys_are_one_clear_error(tmp_path: Path) -> None:
    keygen("server", tmp_path / "keys")
    (tmp_path / "clients").mkdir()
    cases = {
        'curve_secret_key = "keys/missing.key_secret"\ncurve_clients_dir = "clients"': "file does not exist",
        'curve_secret_key = "keys/server.key"\ncurve_clients_dir = "clients"': "holds no secret key",
        'curve_secret_key = "voiced.toml"\ncurve_clients_dir = "clients"': "not a ZeroMQ key file",
        'curve_secret_key = "keys/server.key_secret"': "curve_clients_dir",
        'curve_secret_key = "keys/server.key_secret"\ncurve_clients_dir = "nope"': "folder does not exist",
        'ipc_group = "no-such-group-voiced"': "no such group",
    }
    for server, reason in cases.items():
        config = write_config(tmp_path, server)
        with pytest.raises(ConfigError) as info:
            load_config(config)
        message = str(info.value)
        assert message.startswith(str(config)) and reason in message, message
        key = "ipc_group" if "ipc_group" in server else ("curve_clients_dir" if reason in (
            "curve_clients_dir", "folder does not exist") else "curve_secret_key")
        assert f"[server] {key}" in message, message
    config = write_config(tmp_path, 'curve_secret_key = "keys/missing.key_secret"\ncurve_clients_dir = "clients"')
    result = voiced("serve", "--config", str(config))
    assert result.returncode == 1
    assert "[server] curve_secret_key" in result.stderr and "missing.key_secret" in result.stderr
