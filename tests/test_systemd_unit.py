"""The systemd files in systemd/: parse, check the directives that matter, verify with systemd-analyze.

The parsing checks run everywhere; the systemd-analyze ones skip where the tool is missing
(or too old for --offline) so CI machines without systemd still pass.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
SYSTEM_UNIT = SYSTEMD / "voiced.service"
USER_UNIT = SYSTEMD / "voiced-user.service"
MAX_EXPOSURE = 3.0


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax, as much as the checks need: sections of key -> [values]."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # continuation
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(section: dict[str, list[str]], key: str) -> str | None:
    values = section.get(key)
    return values[-1] if values else None


@pytest.fixture(scope="module")
def system_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(SYSTEM_UNIT)


@pytest.fixture(scope="module")
def user_unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(USER_UNIT)


# ---- static checks --------------------------------------------------------------------------


def test_system_unit_lifecycle(system_unit) -> None:
    svc = system_unit["Service"]
    assert last(svc, "Type") == "notify"
    assert last(svc, "NotifyAccess") == "main"
    assert last(svc, "ExecStart") == "/usr/bin/voiced serve"
    assert last(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(svc, "WatchdogSec") == "30"
    assert last(svc, "Restart") == "on-failure"
    assert last(svc, "TimeoutStopSec") == "30"
    assert last(system_unit["Install"], "WantedBy") == "multi-user.target"


def test_system_unit_identity_and_directories(system_unit) -> None:
    svc = system_unit["Service"]
    assert last(svc, "User") == "voiced"
    assert last(svc, "Group") == "voiced"
    assert "DynamicUser" not in svc  # the voices folder is shared with group voiced
    for key in ("StateDirectory", "CacheDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert last(svc, key) == "voiced", key
    assert last(svc, "RuntimeDirectoryMode") == "0750"
    assert last(svc, "StateDirectoryMode") == "0750"
    assert last(svc, "CacheDirectoryMode") == "0700"
    umask = last(svc, "UMask")
    assert umask is not None and int(umask, 8) & 0o007 == 0o007, "others must get nothing"


def test_sysusers_creates_the_account() -> None:
    lines = [
        line.split()
        for line in (SYSTEMD / "voiced.sysusers.conf").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert any(fields[0] == "u" and fields[1] == "voiced" for fields in lines)


def test_tmpfiles_modes_agree_with_the_unit(system_unit) -> None:
    entries = {}
    for line in (SYSTEMD / "voiced.tmpfiles.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            fields = line.split()
            entries[fields[1]] = fields
    svc = system_unit["Service"]
    assert entries["/var/lib/voiced"][2] == last(svc, "StateDirectoryMode")
    assert entries["/var/cache/voiced"][2] == last(svc, "CacheDirectoryMode")
    voices = entries["/var/lib/voiced/voices"]
    assert voices[2] == "2770" and voices[3:5] == ["voiced", "voiced"]


HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "PrivateDevices": "no",  # the GPU must stay visible
    "DevicePolicy": "closed",
}


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_system_unit_hardening(system_unit, key: str, value: str) -> None:
    assert last(system_unit["Service"], key) == value


def test_system_unit_syscalls_and_sockets(system_unit) -> None:
    svc = system_unit["Service"]
    assert "@system-service" in svc["SystemCallFilter"]
    families = set(last(svc, "RestrictAddressFamilies").split())
    # AF_NETLINK: libzmq's tcp bind calls getifaddrs() and aborts without it
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


def test_system_unit_keeps_what_torch_and_cuda_need(system_unit) -> None:
    svc = system_unit["Service"]
    # JIT (oneDNN, CUDA PTX) needs W+X memory; CUDA reads /proc/driver/nvidia
    assert last(svc, "MemoryDenyWriteExecute") in (None, "no")
    assert last(svc, "ProcSubset") in (None, "all")
    # torch calls mbind/sched_setaffinity (@resources)
    assert not any("@resources" in v and v.startswith("~") for v in svc["SystemCallFilter"])
    allowed = {v.split()[0] for v in svc["DeviceAllow"]}
    assert {"char-nvidia-frontend", "char-nvidia", "char-nvidia-uvm", "char-nvidia-caps"} <= allowed
    assert all(v.split()[1] == "rw" for v in svc["DeviceAllow"])


def test_user_unit(user_unit) -> None:
    svc = user_unit["Service"]
    assert last(svc, "Type") == "notify"
    assert last(svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert last(svc, "WatchdogSec") == "30"
    assert "User" not in svc and "Group" not in svc  # meaningless in a user manager
    # StateDirectory= would mean ~/.local/state, not the XDG data folder the daemon defaults to
    assert "StateDirectory" not in svc
    # mount-namespace sandboxing fails in user managers where unprivileged userns is restricted
    for key in ("ProtectSystem", "PrivateTmp", "ProtectHome", "PrivateDevices"):
        assert key not in svc, key
    assert "AF_NETLINK" in last(svc, "RestrictAddressFamilies")
    assert last(user_unit["Install"], "WantedBy") == "default.target"


def test_default_config_is_valid(tmp_path: Path) -> None:
    """systemd/config.toml uses only keys voiced's loader knows (paths redirected to tmp)."""
    from voiced.config import load_config

    text = (SYSTEMD / "config.toml").read_text(encoding="utf-8")
    assert 'dir = "/var/lib/voiced/voices"' in text
    assert 'dir = "/var/cache/voiced"' in text
    (tmp_path / "voices").mkdir()
    text = text.replace("/var/lib/voiced/voices", str(tmp_path / "voices"))
    text = text.replace("/var/cache/voiced", str(tmp_path / "cache"))
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    assert config.voices.dir == tmp_path / "voices"
    assert config.cache.dir == tmp_path / "cache"
    assert config.server.endpoints == ("ipc:///run/voiced/voiced.sock", "tcp://127.0.0.1:5599")


def test_default_config_check_config_cli(tmp_path: Path) -> None:
    """The same through `voiced check-config`, as the README tells admins to run it."""
    text = (SYSTEMD / "config.toml").read_text(encoding="utf-8")
    (tmp_path / "voices").mkdir()
    text = text.replace("/var/lib/voiced/voices", str(tmp_path / "voices"))
    text = text.replace("/var/cache/voiced", str(tmp_path / "cache"))
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "voiced", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ipc:///run/voiced/voiced.sock" in proc.stdout


# ---- systemd-analyze ------------------------------------------------------------------------


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    return tool


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 0


def _voiced_executable() -> str:
    exe = shutil.which("voiced") or str(Path(sys.executable).with_name("voiced"))
    if not Path(exe).is_file():
        pytest.skip("the voiced command is not installed")
    return exe


def _installable_copy(unit: Path, dest: Path, name: str = "voiced.service") -> Path:
    """The unit with ExecStart pointing at the installed voiced (verify checks it exists)."""
    text = unit.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^ExecStart=/usr/bin/voiced ", f"ExecStart={_voiced_executable()} ", text)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / name
    path.write_text(text, encoding="utf-8")
    return path


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def test_verify_system_unit(tmp_path: Path) -> None:
    tool = _analyze()
    unit = _installable_copy(SYSTEM_UNIT, tmp_path)
    proc = _run([tool, "verify", str(unit)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # anything said about our own unit is a problem, even when verify exits 0
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "voiced.service" in line]
    assert not ours, "\n".join(ours)


def test_verify_user_unit(tmp_path: Path) -> None:
    tool = _analyze()
    unit = _installable_copy(USER_UNIT, tmp_path / "units")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    import os

    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    proc = _run([tool, "--user", "verify", str(unit)], env=env)
    if proc.returncode != 0 and "Failed to initialize manager" in proc.stderr:
        pytest.skip(f"systemd-analyze --user cannot start a manager here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if "voiced.service" in line]
    assert not ours, "\n".join(ours)


def test_security_exposure() -> None:
    tool = _analyze()
    if _systemd_version(tool) < 252:
        pytest.skip("systemd-analyze security --offline needs systemd >= 252")
    proc = _run([tool, "security", "--offline=yes", "--no-pager", str(SYSTEM_UNIT)])
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout + proc.stderr)
    if match is None:
        pytest.skip(f"no exposure score from systemd-analyze security: {proc.stderr.strip()[:300]}")
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, proc.stdout


def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """Both files apply cleanly to an empty root: the account, then the folders with their modes."""
    import os

    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if not sysusers or not tmpfiles:
        pytest.skip("systemd-sysusers/systemd-tmpfiles not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root (tmpfiles chowns to the new account)")
    root = tmp_path / "root"
    for sub in ("etc", "var/lib", "var/cache", "usr/lib/sysusers.d", "usr/lib/tmpfiles.d"):
        (root / sub).mkdir(parents=True)
    shutil.copy(SYSTEMD / "voiced.sysusers.conf", root / "usr/lib/sysusers.d/voiced.conf")
    shutil.copy(SYSTEMD / "voiced.tmpfiles.conf", root / "usr/lib/tmpfiles.d/voiced.conf")
    proc = _run([sysusers, f"--root={root}", "voiced.conf"])
    assert proc.returncode == 0, proc.stderr
    passwd = (root / "etc/passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("voiced:")).split(":")
    uid, gid, home = int(entry[2]), int(entry[3]), entry[5]
    assert home == "/var/lib/voiced"
    proc = _run([tmpfiles, f"--root={root}", "--create", "voiced.conf"])
    assert proc.returncode == 0, proc.stderr
    for rel, mode in (("var/lib/voiced", 0o750), ("var/lib/voiced/voices", 0o2770), ("var/cache/voiced", 0o700)):
        st = (root / rel).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), rel
        assert st.st_mode & 0o7777 == mode, f"{rel}: {oct(st.st_mode & 0o7777)}"
