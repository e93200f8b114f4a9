"""Run docker-compose.yml's services without Docker: each service's entrypoint + command with its compose
environment, as local processes in a network namespace of its own (named after the service, with a tag
per run; its peers reachable by their service names through /etc/netns/NAME/hosts), its volumes mapped
to host folders.

What Docker would do and this does instead:
- volumes: a folder per volume, bound in the mount namespaces of the services that mount it (read-only
  where compose says so), an empty folder in the others';
- the image: the test's own virtual environment on PATH and this checkout on PYTHONPATH (the Dockerfile
  installs the same packages), with the Dockerfile's ENV lines;
- the compose network: a bridge in the root namespace, one veth pair per service, addresses in a free
  /28 of TEST-NET-2 (198.51.100.0/24); a default route via the bridge, as a container has (Ray picks
  the address it advertises from the route to the outside);
- a container's processes and files: PID and mount namespaces per service, a folder per service bound
  over /tmp/ray (Ray's sessions) and HOME (`ServiceNetwork.command` says why Ray needs them);
- a published port: `PortForward`, a TCP relay on the host's loopback (Docker's userland proxy).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import yaml

NETWORK = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2: no real host, no private range
NETNS_ETC = Path("/etc/netns")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable syntax: $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR:?error}, $VAR."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        found = variables.get(name, "")
        if operator == ":?" and not found:
            raise KeyError(f"compose needs ${name}: {argument}")
        return found or (argument if operator == ":-" else "")

    pattern = r"\$\$|\$\{([A-Za-z_]\w*)(?:(:[-?])([^}]*))?\}|\$([A-Za-z_]\w*)"
    return re.sub(pattern, one, value)


def _interpolate_tree(node: object, variables: dict[str, str]) -> object:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(item, variables) for key, item in node.items()}
    return node


def dockerfile_env(dockerfile: Path) -> dict[str, str]:
    """The `ENV k=v k=v` lines of a Dockerfile (the only form this one uses)."""
    env = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line.split()[1:])
    return env


@dataclass(frozen=True)
class Mount:
    """A volume of a service: the host folder holding its files, and the folder where the service sees
    them (bound there in its mount namespace; the other services see that folder empty)."""

    source: Path
    target: Path
    read_only: bool


@dataclass
class Service:
    """One container of a compose service: `name` is the service's (`encoder-2` for a replica)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, Mount]  # by container path
    healthcheck: list[str]

    def host_path(self, text: str) -> str:
        """`text` with every container path of a mount replaced by the folder the service sees it at."""
        if not self.mounts:
            return text
        inside = "|".join(re.escape(m) for m in sorted(self.mounts, key=len, reverse=True))
        return re.sub(rf"({inside})(?![\w.-])", lambda m: str(self.mounts[m.group(1)].target), text)


def load_services(
    compose_file: Path, variables: dict[str, str], root: Path, names: list[str]
) -> list[Service]:
    """The services `names` of `compose_file` (replicas expanded), interpolated with `variables`. A named
    volume or ./folder NAME holds its files in root/volumes/NAME, seen by the services that mount it at
    root/mounts/NAME (made here, as every mount point)."""
    compose = _interpolate_tree(yaml.safe_load(compose_file.read_text()), variables)
    assert isinstance(compose, dict)
    services = []
    for name in names:
        spec = compose["services"][name]
        mounts = {}
        for volume in spec.get("volumes", []):
            source, inside, *mode = volume.split(":")
            folder = source.removeprefix("./")
            mount = Mount(root / "volumes" / folder, root / "mounts" / folder, mode == ["ro"])
            mount.source.mkdir(parents=True, exist_ok=True)
            mount.target.mkdir(parents=True, exist_ok=True)
            mounts[inside] = mount
        argv = [*_as_list(spec.get("entrypoint")), *_as_list(spec.get("command"))]
        env = {key: str(value) for key, value in (spec.get("environment") or {}).items()}
        replicas = spec.get("deploy", {}).get("replicas", 1)
        for n in range(1, replicas + 1):
            service = Service(name if replicas == 1 else f"{name}-{n}", argv, env, mounts, [])
            service.argv = [service.host_path(a) for a in argv]
            service.env = {k: service.host_path(v) for k, v in env.items()}
            test = spec.get("healthcheck", {}).get("test", [])
            service.healthcheck = [service.host_path(a) for a in test[1:]]  # after CMD
            services.append(service)
    return services


def _as_list(value: object) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def free_subnet() -> ipaddress.IPv4Network:
    """A /28 of NETWORK that no route or address of this machine overlaps (another run may hold one)."""
    taken = []
    for entry in json.loads(_ip("-j", "-4", "route", "show", "table", "all")):
        if entry.get("dst", "default") != "default":
            taken.append(ipaddress.ip_network(entry["dst"], strict=False))
    subnets = list(NETWORK.subnets(new_prefix=28))[1:]
    secrets.SystemRandom().shuffle(subnets)
    for subnet in subnets:
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError(f"every /28 of {NETWORK} is in use on this machine")


class ServiceNetwork:
    """A bridge and a network namespace per service name; `close()` kills what runs in them and removes
    all of it (namespaces, their /etc/netns folders, the bridge), touching nothing else."""

    def __init__(self, names: list[str]) -> None:
        tag = secrets.token_hex(2)  # runs side by side do not collide
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = hosts[0]
        self.bridge = f"otbr{tag}"
        self.namespaces = {name: f"{name}-{tag}" for name in names}
        self.addresses = {name: hosts[i + 1] for i, name in enumerate(names)}
        self.made_netns_etc = not NETNS_ETC.exists()
        self._created: list[str] = []
        try:
            self._create(tag)
        except BaseException:
            self.close()
            raise

    def _create(self, tag: str) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addresses.items())
        for i, (name, ns) in enumerate(self.namespaces.items()):
            _ip("netns", "add", ns)
            self._created.append(ns)
            (NETNS_ETC / ns).mkdir(parents=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts)
            veth = f"ot{tag}v{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[name]}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", str(self.gateway))

    def command(self, service: Service, argv: list[str], ray_tmp: Path) -> list[str]:
        """`argv` in the service's network namespace, in a PID and mount namespace of its own (as a
        container is), with its volumes bound where it sees them and `ray_tmp` over /tmp/ray (mounts made
        there do not reach the host).

        Ray needs both: a driver joins the node whose raylet it sees in `ps` (the head's, given the
        choice), and reads the cluster's address from /tmp/ray; every node keeps its session under the
        head's temp folder, /tmp/ray. Seeing the other services' processes, the worker and ingest drivers
        would take the head's node, and other nodes could not reach them at its address."""
        steps = ["mkdir -p /tmp/ray", 'mount --bind "$0" /tmp/ray']
        for mount in service.mounts.values():
            steps.append(f"mount --bind {quote(str(mount.source))} {quote(str(mount.target))}")
            if mount.read_only:
                steps.append(f"mount -o remount,bind,ro {quote(str(mount.target))}")
        script = " && ".join([*steps, 'exec "$@"'])
        netns = ["ip", "netns", "exec", self.namespaces[service.name]]
        # --kill-child: the service goes when the unshare process in between is killed (a timeout)
        isolate = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
        return [*netns, *isolate, "sh", "-c", script, str(ray_tmp), *argv]

    def run(
        self, service: Service, argv: list[str], env: dict[str, str], log: Path, cwd: Path
    ) -> subprocess.Popen:
        """Start `argv` as `service`, with `cwd/ray` as its /tmp/ray, output to `log`."""
        (cwd / "ray").mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(service, argv, cwd / "ray"),
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check(self, service: Service, env: dict[str, str], cwd: Path, timeout_s: float) -> bool:
        """Whether the service's compose health check exits 0 within `timeout_s`, run beside it."""
        try:
            done = subprocess.run(
                self.command(service, service.healthcheck, cwd / "ray"),
                env=env,
                cwd=cwd,
                capture_output=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def pids(self, name: str) -> list[int]:
        """Every process in `name`'s namespace (Ray's daemons too, whatever their session)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[name]], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        names = [n for n, ns in self.namespaces.items() if ns in self._created]
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for name in names:
                for pid in self.pids(name):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(self.pids(n) for n in names):
                time.sleep(0.2)
        for ns in self._created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its veth end goes with it
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if self.made_netns_etc:
            try:
                NETNS_ETC.rmdir()
            except OSError:  # another run's folders are in it
                pass


class PortForward:
    """A TCP relay from 127.0.0.1:`port` (a free one) to `target`, as Docker publishes a port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
