"""Two "hosts" on one machine for the real pdsh/ssh launch path.

`two_hosts(workdir)` builds two Linux network namespaces joined by a veth pair, each with its
own address (10.231.0.1/24 and 10.231.0.2/24, only inside the namespaces, so no traffic can
leave them), an sshd bound to that address with a host key and a client key generated here
(no password), and a `ssh` wrapper that points at a private client config. Processes in the
namespaces share this machine's filesystem, so the same virtualenv and working tree are
"installed on both hosts", as on a cluster with a shared filesystem.

Name resolution inside the namespaces is local: `ip netns exec` bind-mounts
/etc/netns/<ns>/{hosts,resolv.conf} over /etc, and we write a hosts file naming both
addresses and an empty resolv.conf (resolver falls back to 127.0.0.1 inside the namespace,
which refuses at once), so reverse lookups by sshd and c10d neither leave the namespace nor
wait for a DNS timeout.

Everything is torn down on exit: the sshds and any process still inside the namespaces are
killed by pid, and deleting the namespaces deletes the veth pair.

`unavailable_reason()` says why the set-up cannot run here (not root, no `ip netns`, no sshd,
no pdsh); tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.0"
ADDRS = (f"{SUBNET}.1", f"{SUBNET}.2")
# Same interface name inside both namespaces, so one GLOO_SOCKET_IFNAME fits every host.
IFNAME = "kdcl0"
SSHD = "/usr/sbin/sshd"


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


def unavailable_reason() -> str | None:
    """None when namespaces + sshd + pdsh can be used here; else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    for tool, hint in (
        ("ip", "iproute2"),
        ("ssh", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("pdsh", "pdsh"),
    ):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install {hint})"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install openssh-server)"
    probe = f"kdclprobe{os.getpid()}"
    r = _run("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def install_tools(timeout: float = 600) -> None:
    """apt-get openssh-server and pdsh (root only; the caller decides whether this is allowed)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "update", "-qq"], env=env, check=False, capture_output=True, timeout=timeout
    )
    subprocess.run(
        [
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "openssh-server",
            "openssh-client",
            "pdsh",
            "iproute2",
        ],
        env=env,
        check=False,
        capture_output=True,
        timeout=timeout,
    )


@dataclass
class Hosts:
    addrs: tuple[str, str]
    namespaces: tuple[str, str]
    ifname: str
    workdir: Path
    ssh_config: Path
    bin_dir: Path  # holds the `ssh` wrapper; put it first on PATH
    sshd_procs: list = field(default_factory=list)

    def env(self, base: dict | None = None) -> dict:
        """Environment for a launcher run inside the first namespace."""
        e = dict(os.environ if base is None else base)
        e["PATH"] = f"{self.bin_dir}:{e.get('PATH', '')}"
        return e

    def exec_prefix(self, i: int = 0) -> list[str]:
        """Command prefix that runs a program inside host i's namespace."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def ssh(self, i: int, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        """Run `command` on host i through ssh, from host 0's namespace."""
        return subprocess.run(
            [*self.exec_prefix(0), str(self.bin_dir / "ssh"), self.addrs[i], command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def kill_leftovers(self) -> None:
        """SIGKILL every process still inside the namespaces (all started by this harness)."""
        for ns in self.namespaces:
            r = _run("ip", "netns", "pids", ns, check=False)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)


def _keygen(path: Path) -> None:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kdcl-test", "-f", str(path))


def _write_sshd_config(path: Path, addr: str, work: Path) -> None:
    path.write_text(
        "\n".join(
            [
                f"ListenAddress {addr}",
                "Port 22",
                f"HostKey {work / 'host_key'}",
                f"AuthorizedKeysFile {work / 'authorized_keys'}",
                f"PidFile {work / ('sshd-' + addr + '.pid')}",
                # The keys live in a temporary directory, not in ~/.ssh with ssh's modes.
                "StrictModes no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "X11Forwarding no",
                "PrintMotd no",
                "LogLevel ERROR",
                "",
            ]
        )
    )


def _write_client(work: Path) -> tuple[Path, Path]:
    cfg = work / "ssh_config"
    cfg.write_text(
        "\n".join(
            [
                f"Host {SUBNET}.*",
                "  User root",
                "  Port 22",
                f"  IdentityFile {work / 'client_key'}",
                "  IdentitiesOnly yes",
                "  BatchMode yes",
                "  StrictHostKeyChecking no",
                "  UserKnownHostsFile /dev/null",
                "  ConnectTimeout 5",
                "  LogLevel ERROR",
                "",
            ]
        )
    )
    # DeepSpeed's runner and pdsh's ssh module both call `ssh` from PATH; the wrapper adds the
    # private config so nothing in ~/.ssh is read or written.
    bin_dir = work / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {cfg} "$@"\n')
    wrapper.chmod(0o755)
    return cfg, bin_dir


@contextlib.contextmanager
def two_hosts(workdir: Path, startup_timeout: float = 20.0):
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = str(os.getpid())[-6:]
    namespaces = (f"kdcl{tag}a", f"kdcl{tag}b")
    veth = (f"kdv{tag}a", f"kdv{tag}b")
    _keygen(work / "host_key")
    _keygen(work / "client_key")
    shutil.copy(work / "client_key.pub", work / "authorized_keys")
    cfg, bin_dir = _write_client(work)
    hosts = Hosts(ADDRS, namespaces, IFNAME, work, cfg, bin_dir)
    # sshd refuses to start without its privilege-separation directory.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    import socket

    etc = [Path("/etc/netns") / ns for ns in namespaces]
    try:
        for i, ns in enumerate(namespaces):
            etc[i].mkdir(parents=True, exist_ok=True)
            etc[i].joinpath("hosts").write_text(
                f"127.0.0.1 localhost\n{ADDRS[i]} {socket.gethostname()}\n"
                + "".join(f"{a} kdcl-host{j}\n" for j, a in enumerate(ADDRS) if j != i)
            )
            etc[i].joinpath("resolv.conf").write_text(
                "# empty: no DNS inside the test namespaces\n"
            )
            _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for ns, dev, addr in zip(namespaces, veth, ADDRS):
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "link", "set", dev, "name", IFNAME)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        for i, (ns, addr) in enumerate(zip(namespaces, ADDRS)):
            conf = work / f"sshd_config.{i}"
            _write_sshd_config(conf, addr, work)
            log = open(work / f"sshd.{i}.log", "w")
            hosts.sshd_procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.time() + startup_timeout
        for i in range(2):
            while True:
                r = hosts.ssh(i, "echo ok")
                if r.returncode == 0 and r.stdout.strip() == "ok":
                    break
                if time.time() > deadline:
                    logs = "".join((work / f"sshd.{j}.log").read_text() for j in range(2))
                    raise RuntimeError(
                        f"sshd on {ADDRS[i]} not reachable: {r.stderr.strip()}\n{logs}"
                    )
                time.sleep(0.3)
        yield hosts
    finally:
        hosts.kill_leftovers()
        for p in hosts.sshd_procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(timeout=5)
        for ns in namespaces:
            _run("ip", "netns", "del", ns, check=False)
        # The veth pair goes with its namespaces; remove it too in case a move failed.
        _run("ip", "link", "del", veth[0], check=False)
        for d in etc:
            shutil.rmtree(d, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty: other namespaces' files stay
