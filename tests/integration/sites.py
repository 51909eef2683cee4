"""Real sites for integration tests: a CA, site certificates, encrypted stores, ``site.yaml``
files and ``dvx-dr site serve`` processes on 127.0.0.1.

Everything goes through the real ``dvx-dr`` command (``pki init-ca``, ``pki issue-site``,
``site init``, ``site serve``, and the store commands), run as child processes::

    with Sites(tmp_path) as sites:
        a, b = sites.add_many("site-a", "site-b")
        sites.mesh()                  # every site lists every other one as a peer
        sites.start()                 # `site serve`, waits until both listeners accept
        a.cli("volume", "import", "vm1", image)        # --store/--password-file appended
        stats = a.replicate("vm1@s1", to="site-b")     # --config appended, --json parsed
        b.kill(); b.start()

Store commands always name the store (``--store``): when the site runs, the CLI finds its
admin socket in the store's lock file and sends the command there. ``replicate``, ``status``
and ``pg`` name the site by ``--config``.

Unix socket paths must stay under 107 bytes, and pytest's ``tmp_path`` can be longer, so the
admin sockets live in a short directory under /tmp, removed by :meth:`Sites.close`.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dvx_dr.site.store import Store
from tests.conftest import cli_env

HOST = "127.0.0.1"
#: Commands that talk to a running site and name it by ``--config`` rather than ``--store``.
SITE_COMMANDS = {"replicate", "status", "pg"}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def child_env() -> dict[str, str]:
    """Environment of every child: no inherited ``DVX_DR_*``, a weak KDF cost for speed."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("DVX_DR_")}
    env["DVX_DR_KDF_COST"] = "test"
    return env


def dvx(*args: str | Path, check: bool = True, input: bytes | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run ``dvx-dr ARGS`` in a child process; raise with its stderr if it fails and ``check``."""
    proc = subprocess.run([sys.executable, "-m", "dvx_dr", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=child_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"dvx-dr {' '.join(map(str, args))} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def user_error(proc: subprocess.CompletedProcess[bytes], *words: str) -> str:
    """Assert a clear user error: exit 2, one line on stderr, no traceback. Return the line."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}: {err}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {err}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def dvx_parallel(*commands: Sequence[str | Path]) -> None:
    """Run several ``dvx-dr`` commands side by side; raise if any fails."""
    with ThreadPoolExecutor(len(commands)) as pool:
        for future in [pool.submit(dvx, *args) for args in commands]:
            future.result()


#: Ports handed out by ``free_port`` in this test run, never handed out twice.
_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on HOST now, below the kernel's ephemeral range. A port the kernel picks
    (bind to port 0) comes from that range, and the kernel may give it to an outgoing
    connection (a site dialling its peer) before the site that is to listen on it starts."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(low, 10001))
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free TCP port on {HOST} between 10000 and {low}")


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port``, read from /proc so that the site does not see
    (and log) a probe connection that never completes a TLS handshake."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _accepts_unix(path: Path) -> bool:
    """True when something listens on ``path`` (a stale socket file refuses connections)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _q(path: Path) -> str:
    """A path as a YAML scalar (a JSON string is one), whatever characters it holds."""
    return json.dumps(str(path))


class SiteNotReady(AssertionError):
    """A site process did not come up (its log is in the message)."""


class Site:
    """One site: its directory (store, site.yaml, password, log), certificate and process."""

    def __init__(self, name: str, root: Path, pki: Path, admin_socket: Path) -> None:
        self.name = name
        self.root = root
        self.pki = pki
        self.admin_socket = admin_socket
        self.port = free_port()
        self.peers: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    # -- layout ----------------------------------------------------------------------------

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def config(self) -> Path:
        return self.root / "site.yaml"

    @property
    def password_file(self) -> Path:
        return self.root / "password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().splitlines()[0]

    @property
    def log_path(self) -> Path:
        return self.root / "serve.log"

    @property
    def cert(self) -> Path:
        return self.pki / f"{self.name}.crt"

    @property
    def key(self) -> Path:
        return self.pki / f"{self.name}.key"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def create(self) -> None:
        """Certificate, password file and encrypted store, all through the CLI."""
        self.root.mkdir(parents=True)
        self.password_file.write_text(f"test password of {self.name}, long enough\n")
        self.password_file.chmod(0o600)
        dvx_parallel(["pki", "issue-site", self.pki, self.name, "--host", HOST],
                     ["site", "init", "--store", self.store, "--name", self.name,
                      "--password-file", self.password_file])
        self.write_config()

    def write_config(self) -> None:
        lines = [
            f"name: {self.name}",
            f"store: {_q(self.store)}",
            f"listen: {HOST}:{self.port}",
            "tls:",
            f"  cert: {_q(self.cert)}",
            f"  key: {_q(self.key)}",
            f"  ca: {_q(self.ca)}",
            f"admin_socket: {_q(self.admin_socket)}",
            "peers:" if self.peers else "peers: {}",
            *(f"  {name}: {url}" for name, url in sorted(self.peers.items())),
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def set_peer(self, name: str, url: str) -> None:
        """Point peer ``name`` at ``url`` in site.yaml; applied at the next (re)start."""
        self.peers[name] = url
        self.write_config()

    # -- the process -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start ``dvx-dr site serve``; return once its TLS port listens and its admin socket
        accepts connections."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start ``dvx-dr site serve`` without waiting for it (see :meth:`wait_ready`)."""
        assert not self.running, f"{self.name} is already running"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap
        self._log_file.write(f"---- test harness: starting {self.name} at "
                             f"{time.strftime('%H:%M:%S')}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvx_dr", "site", "serve", "--config", str(self.config),
             "--password-file", str(self.password_file)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=child_env() | {"PYTHONFAULTHANDLER": "1"})

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self._reap()
                raise SiteNotReady(f"{self.name} exited with {code} while starting:\n"
                                   f"{self.log()[-4000:]}")
            if _accepts_unix(self.admin_socket) and _listening(self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise SiteNotReady(f"{self.name} did not start within {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code. SIGKILL if it does not stop in time."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # SIGABRT makes faulthandler write every thread's stack to the log.
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                self._reap()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s; its threads' "
                                     f"stacks are at the end of {self.log_path}") from None
        code = self.proc.returncode
        self._reap()
        return code

    def kill(self) -> None:
        """SIGKILL (kill -9) and wait: no cleanup runs in the site."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: the site rereads site.yaml's peers."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGHUP)

    def _reap(self) -> None:
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log(self) -> str:
        """Everything the site wrote to stdout/stderr, across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # -- commands --------------------------------------------------------------------------

    def site_args(self, args: tuple[str | Path, ...]) -> list[str | Path]:
        """How ``dvx-dr ARGS`` names this site: by ``--config`` for commands served only by
        the running site, by ``--store`` (and password file) for store commands, which reach
        the running site through its admin socket by themselves."""
        words = [str(a) for a in args[:2]]
        if words[0] == "pki" or words[:2] == ["pg", "validate"]:
            return []
        if words[0] in SITE_COMMANDS:
            return ["--config", self.config]
        return ["--store", self.store, "--password-file", self.password_file]

    def cli(self, *args: str | Path, check: bool = True, input: bytes | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """``dvx-dr ARGS`` against this site, running or not."""
        return dvx(*args, *self.site_args(args), check=check, input=input, timeout=timeout)

    def json(self, *args: str | Path) -> Any:
        """``dvx-dr ARGS --json`` against this site, parsed."""
        return json.loads(self.cli(*args, "--json").stdout)

    def popen(self, *args: str | Path) -> subprocess.Popen[bytes]:
        """Start ``dvx-dr ARGS`` against this site without waiting (stdout/stderr piped)."""
        return subprocess.Popen(
            [sys.executable, "-m", "dvx_dr", *map(str, args),
             *map(str, self.site_args(args))],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env())

    def replicate(self, snapshot: str, to: str) -> dict[str, Any]:
        """Replicate ``snapshot`` to site ``to`` through this running site; the stats."""
        return dict(self.json("replicate", snapshot, "--to", to))

    def snapshots(self) -> list[str]:
        return [s["snapshot"] for s in self.json("snapshot", "list")]

    def stats(self) -> dict[str, Any]:
        return dict(self.json("datastore", "stats"))

    def open_store(self) -> Store:
        """The store, opened in this process (the site must be stopped: one owner at a time)."""
        assert not self.running, f"{self.name} runs and owns its store; stop it first"
        password = self.password
        return Store.open(self.store, lambda: password)

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.running and self.proc else "stopped"
        return f"<Site {self.name} :{self.port} {state}>"


class Sites:
    """A set of sites sharing one CA. A context manager: leaving it stops every site."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.pki = base / "pki"
        self.sockets = Path(tempfile.mkdtemp(prefix="dvx", dir="/tmp"))
        self.sites: dict[str, Site] = {}
        dvx("pki", "init-ca", self.pki)

    def add(self, name: str) -> Site:
        """Create a site: certificate, encrypted store, site.yaml without peers."""
        return self.add_many(name)[0]

    def add_many(self, *names: str) -> list[Site]:
        """Create several sites side by side (see :meth:`add`)."""
        new = [Site(name, self.base / name, self.pki, self.sockets / f"{name}.sock")
               for name in names]
        with ThreadPoolExecutor(len(new)) as pool:
            for future in [pool.submit(site.create) for site in new]:
                future.result()
        self.sites.update((site.name, site) for site in new)
        return new

    def mesh(self) -> None:
        """Make every site a peer of every other one (by its real address)."""
        for site in self.sites.values():
            for other in self.sites.values():
                if other is not site:
                    site.peers[other.name] = other.url
            site.write_config()

    def start(self, *names: str) -> None:
        """Start the named sites (default: every stopped one) side by side; wait for all."""
        chosen = [self.sites[n] for n in names] if names else \
            [s for s in self.sites.values() if not s.running]
        for site in chosen:
            site.spawn()
        for site in chosen:
            site.wait_ready()

    def issue(self, name: str, ca_dir: Path | None = None) -> tuple[Path, Path]:
        """A site certificate and key for ``name`` from our CA (or from the CA in ``ca_dir``)."""
        where = ca_dir or self.pki
        dvx("pki", "issue-site", where, name, "--host", HOST)
        return where / f"{name}.crt", where / f"{name}.key"

    def other_ca(self, name: str = "other-ca") -> Path:
        """A second, unrelated CA (its directory)."""
        path = self.base / name
        if not (path / "ca.crt").exists():
            dvx("pki", "init-ca", path, "--name", f"unrelated {name}")
        return path

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    def close(self) -> None:
        errors = []
        for site in self.sites.values():
            try:
                code = site.stop()
            except AssertionError as exc:
                errors.append(str(exc))
                continue
            if code != 0:
                errors.append(f"{site.name} exited with {code} on SIGTERM:\n{site.log()[-2000:]}")
        shutil.rmtree(self.sockets, ignore_errors=True)
        if errors:
            raise AssertionError("; ".join(errors))

    def __enter__(self) -> Sites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def internal_errors(log: str) -> list[str]:
    """Lines of a site log that show a bug (an unexpected exception), not a handled error."""
    return [line for line in log.splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line]


@contextlib.contextmanager
def started(base: Path, *names: str) -> Iterator[Sites]:
    """``Sites`` with ``names`` created, meshed and started; stopped on exit."""
    with Sites(base) as sites:
        sites.add_many(*names)
        sites.mesh()
        sites.start()
        yield sites
