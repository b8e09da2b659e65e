"""Network access control: CURVE keys for tcp:// endpoints, file permissions for ipc:// ones.

* With ``[server] curve_secret_key`` set, every tcp:// endpoint requires CURVE and only clients
  whose public key is in ``curve_clients_dir`` get in; ZeroMQ drops the others in the handshake
  (they get no answer at all). ipc:// endpoints stay unauthenticated: their socket file is
  0660 (optionally chowned to ``ipc_group``), in a folder made 0750 when the daemon creates it.
* Binding a non-loopback tcp address without CURVE is refused unless ``allow_insecure = true``.

See SECURITY.md for the threat model.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from voiced.errors import ConfigError, VoicedError

log = logging.getLogger(__name__)

ZAP_DOMAIN = "voiced"
IPC_SOCKET_MODE = 0o660
IPC_DIR_MODE = 0o750


def _key(name: str) -> str:
    return f"[server] {name}"


def endpoint_host(endpoint: str) -> str:
    """The address part of a tcp:// endpoint (``tcp://[::1]:5599`` -> ``::1``)."""
    rest = endpoint[len("tcp://"):]
    if ";" in rest:  # tcp://source;destination (connect syntax; the bind address is the last part)
        rest = rest.rsplit(";", 1)[1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def is_loopback(endpoint: str) -> bool:
    """True for tcp:// endpoints bound to 127.0.0.0/8, ::1, localhost or the lo interface."""
    host = endpoint_host(endpoint)
    if host in ("localhost", "lo", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name: assume the network


def curve_enabled(server: Any) -> bool:
    return bool(server.curve_secret_key)


@dataclass(frozen=True)
class ServerKeys:
    public: bytes
    secret: bytes


def load_server_keys(server: Any, where: str = "config") -> ServerKeys | None:
    """The server's CURVE key pair (None when CURVE is off); ConfigError naming the key and file."""
    if not curve_enabled(server):
        return None
    label = f"{where}: {_key('curve_secret_key')}"
    public, secret = _load_certificate(server.curve_secret_key, label, need_secret=True)
    assert secret is not None
    return ServerKeys(public, secret)


def _load_certificate(path: str, label: str, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    file = Path(path)
    if not file.is_file():
        reason = "is not a file" if file.exists() else "file does not exist"
        raise ConfigError(f"{label}: {reason}: {file}")
    try:
        public, secret = zmq.auth.load_certificate(file)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read {file}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: not a ZeroMQ key file ({exc}): {file}") from None
    if need_secret and not secret:
        raise ConfigError(
            f"{label}: {file} holds no secret key (name the .key_secret file written by `voiced keygen`)"
        )
    for value in (public, secret):
        if value is not None and len(value) != 40:
            raise ConfigError(f"{label}: not a valid Z85 CURVE key in {file}")
    return public, secret


def check_server(server: Any, where: str = "config") -> None:
    """Everything about [server] that depends on the machine: keys, folders, group, exposure."""
    tcp = [e for e in server.endpoints if e.startswith("tcp://")]
    exposed = [e for e in tcp if not is_loopback(e)]
    if curve_enabled(server):
        load_server_keys(server, where)
        clients = server.curve_clients_dir
        if not clients:
            raise ConfigError(
                f"{where}: {_key('curve_clients_dir')}: needed with curve_secret_key "
                "(a folder of the allowed clients' public .key files)"
            )
        if not Path(clients).is_dir():
            raise ConfigError(f"{where}: {_key('curve_clients_dir')}: folder does not exist: {clients}")
    elif server.curve_clients_dir:
        raise ConfigError(f"{where}: {_key('curve_clients_dir')}: set, but curve_secret_key is empty")
    elif exposed and not server.allow_insecure:
        raise ConfigError(
            f"{where}: {_key('curve_secret_key')}: {exposed[0]} is reachable from the network; "
            "configure CURVE (curve_secret_key, curve_clients_dir; see `voiced keygen`) "
            "or set allow_insecure = true"
        )
    if server.ipc_group:
        group_id(server.ipc_group, where)


def group_id(name: str, where: str = "config") -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: {_key('ipc_group')}: no such group: {name!r}") from None


class CurveAuth:
    """pyzmq's authenticator thread (the ZAP handler) for the server's context."""

    def __init__(self, context: zmq.Context, clients_dir: str) -> None:
        self.context = context
        self.clients_dir = clients_dir
        self._auth: Any = None

    def start(self) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger("voiced.auth"))
        self._auth.start()
        self.configure()

    def configure(self) -> int:
        """(Re)read the allowed clients' public keys; returns how many there are."""
        if self._auth is None:
            return 0
        count = len(list(Path(self.clients_dir).glob("*.key")))
        self._auth.configure_curve(domain=ZAP_DOMAIN, location=self.clients_dir)
        log.info("CURVE: %d allowed client key(s) from %s", count, self.clients_dir)
        return count

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def prepare_ipc(endpoint: str) -> Path | None:
    """Before binding: create the socket's folder 0750 when missing. Returns the socket path."""
    path_text = endpoint[len("ipc://"):]
    if not path_text or path_text.startswith("@") or path_text == "*":
        return None  # abstract namespace or a generated name: no file to protect
    path = Path(path_text)
    _check_ipc_free(endpoint, path)
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True, mode=IPC_DIR_MODE)
            os.chmod(parent, IPC_DIR_MODE)  # whatever the umask
        except OSError as exc:
            raise VoicedError(f"cannot create the folder of {endpoint}: {exc.strerror or exc}") from None
    return path


def check_endpoints_free(endpoints: Iterable[str]) -> None:
    """Refuse, before minutes of model loading, endpoints the server could not bind: an ipc path
    another process listens on (or a file that is no socket), a tcp port already taken. The
    binding itself checks again; this only moves the error to the start."""
    for endpoint in endpoints:
        if endpoint.startswith("ipc://"):
            path_text = endpoint[len("ipc://"):]
            if path_text and not path_text.startswith("@") and path_text != "*":
                _check_ipc_free(endpoint, Path(path_text))
        elif endpoint.startswith("tcp://"):
            _check_tcp_free(endpoint)


def _check_tcp_free(endpoint: str) -> None:
    host, port_text = endpoint_host(endpoint), endpoint.rsplit(":", 1)[-1]
    if not port_text.isdigit() or int(port_text) == 0:
        return  # "*" or 0: a port the system picks is always free
    try:
        infos = socket.getaddrinfo("0.0.0.0" if host == "*" else host, int(port_text), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return  # an interface name (tcp://eth0:5599) or a name ZeroMQ resolves its own way
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        # as ZeroMQ binds: a port in TIME_WAIT is usable, one with a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise VoicedError(f"cannot bind {endpoint}: the port is in use (a running voiced?)") from None
        raise VoicedError(f"cannot bind {endpoint}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def _check_ipc_free(endpoint: str, path: Path) -> None:
    """Refuse a path another process listens on, or a file that is not a socket.

    Binding an ipc endpoint replaces whatever file is at its path: a second daemon started by
    mistake would take the first one's socket (which stays running, unreachable), and a
    mistyped path would delete a file.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VoicedError(f"cannot use {endpoint}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise VoicedError(f"cannot bind {endpoint}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return  # nobody listens: a socket left by a process that died; binding replaces it
    finally:
        probe.close()
    raise VoicedError(f"cannot bind {endpoint}: another process (a running voiced?) is listening on it")


def protect_ipc(path: Path, group: str = "") -> None:
    """After binding: the socket file 0660, owned by ``group`` when one is configured."""
    try:
        if group:
            os.chown(path, -1, group_id(group))
        os.chmod(path, IPC_SOCKET_MODE)
    except OSError as exc:
        raise VoicedError(f"cannot set the owner or mode of {path}: {exc.strerror or exc}") from None
    log.debug("ipc socket %s mode %o", path, stat.S_IMODE(os.stat(path).st_mode))


def client_keys(server_key: str | os.PathLike[str], key: str | os.PathLike[str]) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret) for a CURVE client; VoicedError when unreadable."""
    server_public, _ = _load_certificate(str(server_key), "server key (--server-key)", need_secret=False)
    public, secret = _load_certificate(str(key), "client key (--key)", need_secret=True)
    assert secret is not None
    return server_public, public, secret
