"""The admin socket of a real running site (``replicator.adminwire``): its mode, its answers
to requests that break the format, and the client's message for a site of the older protocol.

A bad request gets one error line naming what is wrong (exit code 2, as the command would
exit), and the site goes on serving.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dvx_dr.cli import remote
from dvx_dr.errors import TransientError, UserError
from dvx_dr.replicator.pki import issue_site
from tests.integration.sites import Site, Sites, child_env, dvx
from tests.integration.test_store_cli import export_with_a_write_error, extent_of, flip_byte

MiB = 1024 * 1024


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Sites(tmp_path / "sites") as sites:
        (site,) = sites.add_many("site-a")
        sites.start()
        yield site


def exchange(path: Path, raw: bytes) -> list[dict[str, object]]:
    """Send ``raw`` as is; every answer line until the site closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        return [json.loads(line) for line in sock.makefile("rb")]


def test_admin_socket_is_private_to_its_owner(site: Site) -> None:
    assert stat.S_IMODE(site.admin_socket.stat().st_mode) == 0o600


@pytest.mark.parametrize(("raw", "says"), [
    (b"GET /admin/v1/status HTTP/1.1\r\nHost: site\r\n\r\n", "not one line of JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"v": 99, "call": "status"}\n', "admin protocol version 99 is not supported"),
    (b'{"v": 1, "call": "format-disk"}\n', "unknown admin call 'format-disk'"),
    (b'{"v": 1, "call": "status", "params": [1]}\n', "'params' must be a JSON object"),
    (b'{"v": 1, "call": "op", "params": {"name": 7}}\n', "names the operation"),
    (b'{"v": 1, "call": "op", "params": {"name": "volume.shred", "params": {}}}\n',
     "volume.shred"),
    (b'{"v": 1, "call": "replicate", "params": {"to": "site-b"}}\n', "names a 'snapshot'"),
])
def test_bad_request_gets_an_error_line_and_the_site_keeps_serving(
        site: Site, raw: bytes, says: str) -> None:
    answers = exchange(site.admin_socket, raw)
    assert len(answers) == 1, answers
    assert answers[0]["exit_code"] == 2
    assert says in str(answers[0]["error"])
    assert remote.status(str(site.admin_socket))["site"] == "site-a"


def test_connection_closed_without_a_request_leaves_the_site_serving(site: Site) -> None:
    assert exchange(site.admin_socket, b"") == []
    assert remote.status(str(site.admin_socket))["site"] == "site-a"


def test_operation_error_reaches_the_command_with_its_exit_code(site: Site) -> None:
    with pytest.raises(UserError, match="no-such-volume"):
        remote.call_op(str(site.admin_socket), "volume.read",
                       {"name": "no-such-volume", "offset": 0, "length": 1})
    proc = site.cli("volume", "read", "no-such-volume", "--offset", "0", "--length", "1",
                    check=False)
    assert proc.returncode == 2
    assert b"no-such-volume" in proc.stderr


def test_store_operation_in_flight_when_the_site_stops_answers_with_its_result(
        site: Site, tmp_path: Path) -> None:
    """SIGTERM while an import runs in the store thread: the import finishes, and the
    command gets its result, not an error telling it to run it again."""
    image = tmp_path / "big.img"
    with image.open("wb") as f:
        for _ in range(48):
            f.write(os.urandom(8 * MiB))  # 384 MiB that neither dedups nor compresses
    answer: list[object] = []
    thread = threading.Thread(target=lambda: answer.append(_call_catching(
        site, "volume.import", {"name": "big", "path": str(image)})))
    thread.start()
    deadline = time.monotonic() + 30
    while not (site.store / "segments").exists() or not any(
            p.stat().st_size for p in (site.store / "segments").iterdir()):
        assert time.monotonic() < deadline, "the import did not start"
        time.sleep(0.01)
    assert answer == [], "the import ended before the site was asked to stop"
    assert site.stop() == 0
    thread.join(60)
    assert isinstance(answer[0], dict) and answer[0]["name"] == "big", answer
    site.start()
    assert remote.call_op(str(site.admin_socket), "volume.list", {})[0]["size"] == 384 * MiB


def _call_catching(site: Site, name: str, params: dict[str, object]) -> object:
    try:
        return remote.call_op(str(site.admin_socket), name, params)
    except Exception as exc:  # the test asserts there was none
        return exc


def test_nothing_after_the_request_line_is_read(site: Site, tmp_path: Path) -> None:
    """A client that goes on sending after its request line is not read from: its writes
    block (the site does not buffer them) while the site works on the request, and the
    request is carried out."""
    image = tmp_path / "img"
    with image.open("wb") as f:
        for _ in range(32):
            f.write(os.urandom(8 * MiB))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(site.admin_socket))
        sock.sendall(json.dumps({"v": 1, "call": "op", "params": {
            "name": "volume.import", "params": {"name": "img", "path": str(image)}}}
        ).encode() + b"\n")
        sock.settimeout(0.5)
        sent = 0
        # Sending stops when it blocks for 0.5 s, or when the site, done with the import,
        # closes the connection with the bytes it did not read (a reset).
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            while sent < 256 * MiB:
                sent += sock.send(bytes(MiB))
        assert sent < 16 * MiB
    # The store thread runs one operation at a time: this one waits for the import.
    volumes = remote.call_op(str(site.admin_socket), "volume.list", {})
    assert [(v["name"], v["size"]) for v in volumes] == [("img", 256 * MiB)]


def test_command_that_does_not_take_its_answer_does_not_hold_up_stopping(site: Site) -> None:
    """A command stopped (or stuck) before reading a large answer: SIGTERM still stops the
    site within seconds."""
    remote.call_op(str(site.admin_socket), "volume.create", {"name": "v", "size": 64 * MiB})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(site.admin_socket))
        sock.sendall(json.dumps({"v": 1, "call": "op", "params": {
            "name": "volume.read", "params": {"name": "v", "offset": 0, "length": 64 * MiB}}}
        ).encode() + b"\n")
        time.sleep(1)  # the answer (about 85 MiB of base64) is now waiting to be taken
        started = time.monotonic()
        assert site.stop(timeout=20) == 0
        assert time.monotonic() - started < 15


def _serve_once(path: Path, answer: bytes) -> threading.Thread:
    """A one-connection Unix socket server that reads a request and sends ``answer``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(("answer", "message"), [
    # a site of the older HTTP protocol
    (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
     "older admin protocol .HTTP.: restart it"),
    # an answer cut off mid-line
    (b'{"result": {"site": "site-a", "pe', "in the middle of its answer"),
])
def test_client_names_an_old_site_or_an_answer_cut_off(tmp_path: Path, answer: bytes,
                                                       message: str) -> None:
    path = tmp_path / "site.sock"
    thread = _serve_once(path, answer)
    with pytest.raises(TransientError, match=message):
        remote.status(str(path))
    thread.join(10)


def test_client_reports_a_site_that_closes_before_answering(tmp_path: Path) -> None:
    path = tmp_path / "closing.sock"
    thread = _serve_once(path, b'{"progress": {}}\n')
    with pytest.raises(TransientError, match="closed the connection before it answered"):
        remote.replicate(str(path), {"volume": "vm1", "to": "site-b"}, lambda line: None)
    thread.join(10)


def test_client_reads_an_error_the_site_sent_before_taking_the_whole_request(
        tmp_path: Path) -> None:
    """A site refuses a request before reading all of it (as one above MAX_REQUEST): the
    command's write then fails, and it still reports the site's error line."""
    path = tmp_path / "early.sock"
    thread = _serve_once(path, b'{"error": "the admin request is larger than 9 bytes", '
                               b'"exit_code": 2}\n')
    with pytest.raises(UserError, match="larger than 9 bytes"):
        remote.call_op(str(path), "volume.write",
                       {"name": "v", "offset": 0, "data": "A" * (16 * MiB)})
    thread.join(10)


def test_a_reload_keeps_what_only_a_restart_can_change(site: Site, tmp_path: Path) -> None:
    """SIGHUP with a new site name, admin socket and TLS files: the site had taken the new
    name (then accepting its own certificate from a peer) and the new socket path (then
    unreachable: it still listened on the old one), and reported new TLS files as reloaded
    though it kept serving the old ones. It keeps all three until a restart, and says so."""
    text = site.config.read_text()
    site.config.write_text(text.replace("name: site-a", "name: site-z")
                           .replace(str(site.admin_socket), str(tmp_path / "moved.sock"))
                           .replace(str(site.cert), str(tmp_path / "new.crt")))
    site.reload()
    deadline = time.monotonic() + 10
    while "need a restart" not in site.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "changes to name, admin_socket, tls need a restart" in site.log()
    status = remote.status(str(site.admin_socket))
    assert status["site"] == "site-a"


def test_a_site_refuses_to_start_on_another_sites_certificate_or_a_file_at_its_socket(
        tmp_path: Path) -> None:
    """site-b given site-a's certificate started, and peers took it for site-a; given one
    from another CA, it started and every peer refused it; and a site replaced whatever
    regular file stood at its admin_socket path. Each now refuses to start, in one line, and
    changes nothing."""
    with Sites(tmp_path / "sites") as sites:
        a, b = sites.add_many("site-a", "site-b")
        sites.mesh()
        password = ["--password-file", b.password_file]
        b.write_config()
        b.config.write_text(b.config.read_text().replace(str(b.cert), str(a.cert))
                            .replace(str(b.key), str(a.key)))
        run = dvx("site", "serve", "--config", b.config, *password, check=False, timeout=60)
        err = run.stderr.decode()
        assert run.returncode == 2, err
        assert "is for site 'site-a', not for this site 'site-b'" in err, err
        # A certificate for site-b from another CA: every peer would refuse it at each
        # handshake, and blame this site's peers in its log.
        rogue = tmp_path / "rogue"
        dvx("pki", "init-ca", rogue)
        dvx("pki", "issue-site", rogue, "site-b", "--host", "127.0.0.1")
        b.write_config()
        b.config.write_text(b.config.read_text().replace(str(b.cert), str(rogue / "site-b.crt"))
                            .replace(str(b.key), str(rogue / "site-b.key")))
        run = dvx("site", "serve", "--config", b.config, *password, check=False, timeout=60)
        err = run.stderr.decode()
        assert run.returncode == 2, err
        assert "would be refused by this site's peers" in err, err
        assert "unable to get local issuer certificate" in err, err
        assert len(err.strip().splitlines()) == 1, err
        b.write_config()
        b.admin_socket.parent.mkdir(parents=True, exist_ok=True)
        b.admin_socket.write_text("not a socket")
        run = dvx("site", "serve", "--config", b.config, *password, check=False, timeout=60)
        err = run.stderr.decode()
        assert run.returncode == 2 and "exists and is not a socket" in err, err
        assert b.admin_socket.read_text() == "not a socket"


def test_status_and_metrics_say_when_the_tls_certificate_ends(tmp_path: Path) -> None:
    """A site whose certificate ends in 10 days starts (it is still valid), warns in its log
    and in `status`, and reports the end in `status --json` and the metrics: peers will
    refuse it from then on, and nothing had said so before they did."""
    with Sites(tmp_path / "sites") as sites:
        (a,) = sites.add_many("site-a")
        a.cert.unlink()
        a.key.unlink()
        issue_site(a.pki, "site-a", ["127.0.0.1"], days=10)
        a.start()
        assert "TLS certificate or its CA certificate ends in 9 days" in a.log() or \
            "TLS certificate or its CA certificate ends in 10 days" in a.log(), a.log()
        tls = a.json("status")["tls"]
        assert tls["days_left"] in (9, 10) and tls["warning_days"] == 30, tls
        end = dt.datetime.fromisoformat(tls["certificate_ends"])
        assert dt.timedelta(days=9) < end - dt.datetime.now(dt.UTC) <= dt.timedelta(days=10)
        assert dt.datetime.fromisoformat(tls["ca_ends"]) > end
        run = a.cli("status")
        assert f"({tls['days_left']} days left)" in run.stdout.decode()
        assert "warning: the site's TLS certificate or its CA ends in" in run.stderr.decode()
        metrics = a.cli("status", "--metrics").stdout.decode()
        assert (f'dvx_dr_tls_certificate_end_timestamp_seconds{{certificate="site"}} '
                f"{end.timestamp():.0f}") in metrics, metrics
        assert 'dvx_dr_tls_certificate_end_timestamp_seconds{certificate="ca"}' in metrics


# -- volume and snapshot data through the site: streamed reads, paths it never opens ------


def test_exports_and_reads_through_the_site_stream_any_size(site: Site) -> None:
    """``export -`` and ``read`` through a running site were limited to 256 MiB (the user
    was told to "use export"); offline they stream any size. /dev/stdout got the image and,
    through the site, nothing at all (the site could not open the command's pipe)."""
    size = 300 * MiB
    head, tail = os.urandom(MiB), os.urandom(MiB)
    site.cli("volume", "create", "big", "--size", str(size))
    site.cli("volume", "write", "big", "-", input=head)
    site.cli("volume", "write", "big", "--offset", str(size - MiB), "-", input=tail)
    site.cli("snapshot", "create", "big", "--name", "s")

    def check(image: bytes) -> None:
        assert len(image) == size
        assert image[:MiB] == head and image[-MiB:] == tail
        assert image[MiB:-MiB].count(0) == size - 2 * MiB

    for command in (("volume", "export", "big", "-"),
                    ("snapshot", "export", "big@s", "/dev/stdout"),
                    ("volume", "read", "big", "--length", str(size))):
        check(site.cli(*command, timeout=120).stdout)
    part = site.cli("volume", "read", "big", "--offset", str(size - MiB - 5), "--length", "10")
    assert part.stdout == bytes(5) + tail[:5]


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_site_never_blocks_on_a_fifo_a_command_names(site: Site, tmp_path: Path) -> None:
    """``volume export w FIFO`` and ``volume write w FIFO`` through a running site made the
    site open the FIFO in its store thread: every command hung, and SIGTERM did not stop it.
    The command opens it now (waiting only itself, as offline), and the site refuses to open
    anything but a regular file or a block device."""
    data = os.urandom(3 * 4096)
    site.cli("volume", "create", "w", "--size", str(len(data)))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    export = site.popen("volume", "export", "w", fifo)
    time.sleep(1)  # the export waits for a reader of the FIFO
    listed = site.cli("volume", "list", "--json", timeout=20)
    assert [v["name"] for v in json.loads(listed.stdout)] == ["w"]
    reader = _in_thread(lambda: got.append(fifo.read_bytes()))
    assert export.wait(20) == 0, export.stderr.read() if export.stderr else ""
    reader.join(20)
    assert got == [bytes(len(data))]

    writer = _in_thread(lambda: fifo.write_bytes(data))
    site.cli("volume", "write", "w", fifo, timeout=20)
    writer.join(20)
    assert site.cli("volume", "read", "w", "--length", str(len(data))).stdout == data

    # Another client naming the FIFO by path is refused at once, without opening it.
    answers = exchange(site.admin_socket, json.dumps({
        "v": 1, "call": "op", "params": {"name": "volume.write", "params": {
            "name": "w", "offset": 0, "path": str(fifo)}}}).encode() + b"\n")
    assert answers[0]["exit_code"] == 2
    assert "not a regular file" in str(answers[0]["error"])
    assert site.stop() == 0


def test_writes_from_pipes_named_by_path_go_through_the_site(site: Site) -> None:
    """/dev/stdin and <(...) name the command's own pipe, which the site cannot open ("cannot
    read /proc/PID/fd/pipe:[N]"): the command reads them, as it reads '-'."""
    site.cli("volume", "create", "w", "--size", "4096")
    site.cli("volume", "write", "w", "/dev/stdin", input=b"abc")
    r, w = os.pipe()
    os.write(w, b"xyz")
    os.close(w)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvx_dr", "volume", "write", "w", "--offset", "3",
             f"/dev/fd/{r}", *map(str, site.site_args(("volume", "write")))],
            capture_output=True, pass_fds=(r,), env=child_env(), timeout=60)
    finally:
        os.close(r)
    assert proc.returncode == 0, proc.stderr
    assert site.cli("volume", "read", "w", "--length", "6").stdout == b"abcxyz"
    # Standard input that is a deleted file (a shell's large here-document) has a path the
    # site cannot open either: the command reads it too.
    with tempfile.TemporaryFile(dir=site.root) as f:
        f.write(b"def")
        f.seek(0)
        proc = subprocess.run(
            [sys.executable, "-m", "dvx_dr", "volume", "write", "w", "--offset", "6",
             "/dev/stdin", *map(str, site.site_args(("volume", "write")))],
            stdin=f, capture_output=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert site.cli("volume", "read", "w", "--length", "9").stdout == b"abcxyzdef"


def test_stdin_write_past_the_end_through_the_site_names_its_true_end(site: Site) -> None:
    site.cli("volume", "create", "w", "--size", "10000")
    proc = site.cli("volume", "write", "w", "-", input=bytes(5 * MiB), check=False)
    assert proc.returncode == 2
    assert "it is 10000 bytes, the write reaches byte 5242880;" in proc.stderr.decode()


def test_export_through_the_site_that_cannot_write_is_one_line_and_keeps_nothing(
        site: Site, tmp_path: Path) -> None:
    """A full disk gave "internal error: OSError(28, ...)", exit 1, a traceback in the site's
    log and the partial file; offline it was one line, exit 2, and the file removed."""
    site.cli("volume", "import", "v", _random_image(tmp_path / "v.img", MiB))
    proc = site.cli("volume", "export", "v", "/dev/full", check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode().count("\n") == 1
    assert "No space left on device" in proc.stderr.decode()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    err = export_with_a_write_error(
        ["volume", "export", "v", out_dir / "v.raw",
         *site.site_args(("volume", "export"))], out_dir / "v.raw")
    assert "cannot write" in err
    assert "admin request failed" not in site.log()


def test_export_through_the_site_of_damaged_data_keeps_the_old_file(
        site: Site, tmp_path: Path) -> None:
    # Damage in the second batch of blocks read, after some of the image was written.
    site.cli("volume", "import", "v", _random_image(tmp_path / "v.img", 5 * MiB))
    site.cli("snapshot", "create", "v", "--name", "s")
    flip_byte(site.store, *extent_of(site.store, "v", 70))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    old = out_dir / "old.raw"
    for command in (("volume", "export", "v", old), ("snapshot", "export", "v@s", old),
                    ("volume", "read", "v", "--length", str(5 * MiB), "-o", old)):
        old.write_bytes(b"OLD IMAGE")
        proc = site.cli(*command, check=False)
        assert proc.returncode == 3, (command, proc.stderr)
        assert "integrity" in proc.stderr.decode()
        assert old.read_bytes() == b"OLD IMAGE", command
        assert sorted(p.name for p in out_dir.iterdir()) == ["old.raw"], command


def test_a_stalled_reader_of_an_export_does_not_hold_up_stopping(site: Site) -> None:
    """The store thread hands an export to the command piece by piece: a command that stops
    reading holds it, but SIGTERM still stops the site within seconds."""
    site.cli("volume", "create", "big", "--size", str(256 * MiB))
    site.cli("volume", "write", "big", "-", input=b"\1" * 32 * MiB)  # one block, deduplicated
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(site.admin_socket))
        sock.sendall(json.dumps({"v": 1, "call": "read", "params": {"volume": "big"}}
                                ).encode() + b"\n")
        first = json.loads(sock.makefile("rb").readline())
        assert isinstance(first.get("bytes"), int), first
        started = time.monotonic()
        assert site.stop() == 0
        assert time.monotonic() - started < 15


def _random_image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_an_import_interrupted_at_the_command_leaves_no_volume_in_the_site(
        site: Site, tmp_path: Path) -> None:
    """Ctrl-C of ``volume import`` through a running site: the command said "interrupted",
    but the site went on to finish the import, so the name stayed taken. The site now stops
    the import when its command goes away and drops the volume, as an offline import does."""
    image = tmp_path / "img"
    with image.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(8 * MiB))
    proc = site.popen("volume", "import", "big", image)
    try:
        # Under way: 1 GiB of random data takes the site well over a second (512 MiB had
        # been done within the second on a quiet machine).
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # as Ctrl-C
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    # The site notices at its next batch; what it holds then is dropped.
    deadline = time.monotonic() + 20
    while "was stopped: its command went away" not in site.log():
        assert time.monotonic() < deadline, site.log()[-2000:]
        time.sleep(0.1)
    names = [v["name"] for v in remote.call_op(str(site.admin_socket), "volume.list", {})]
    assert "big" not in names
    site.cli("volume", "import", "big", image)  # the name is free again
    assert [v["name"] for v in remote.call_op(str(site.admin_socket), "volume.list", {})] \
        == ["big"]


def test_a_site_and_a_command_reading_a_password_cannot_dump_core(site: Site,
                                                                  tmp_path: Path) -> None:
    """A crash of a site wrote its memory, with the keys and any password sent to it, to a
    core file. A site now forbids core dumps first thing (limit 0, not dumpable), and so
    does a command that reads a password."""
    assert site.proc is not None
    limits = Path(f"/proc/{site.proc.pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    probe = (  # prctl(PR_GET_DUMPABLE) before and after reading the password
        "import ctypes, sys; from pathlib import Path; "
        "from dvx_dr.cli.context import read_password_file; "
        "dumpable = lambda: bool(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)); "
        "before = dumpable(); read_password_file(Path(sys.argv[1])); "
        "print(before, dumpable())")
    out = subprocess.run([sys.executable, "-c", probe, str(site.password_file)],
                         capture_output=True, env=child_env(), check=True)
    assert out.stdout.split() == [b"True", b"False"]


def _slow_read(site: Site, params: dict[str, object]) -> socket.socket:
    """A streamed read whose command then takes nothing (a stalled pipe, say)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(site.admin_socket))
    sock.sendall(json.dumps({"v": 1, "call": "read", "params": params}).encode() + b"\n")
    time.sleep(1.0)  # the site fills the socket and its queue, then waits
    return sock


def _drain(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    data = bytearray()
    while chunk := sock.recv(1 << 20):
        data += chunk
    return bytes(data)


def test_a_slow_reader_of_an_export_does_not_stop_the_site(site: Site, tmp_path: Path) -> None:
    """An export through the site whose command read slowly held the store thread for the
    whole export: every other command, scheduled snapshot and transfer waited (a reader of
    1 MiB every 2 s held a 'snapshot create' for 28 s). A snapshot is now read in turns,
    with other work in between; a live volume (read as of one instant, holding the store)
    is given up, with advice, once other work has waited on its slow reader for 2 s."""
    image = tmp_path / "img"
    image.write_bytes(os.urandom(64 * MiB))
    site.cli("volume", "import", "v", image)
    site.cli("snapshot", "create", "v", "--name", "s")

    sock = _slow_read(site, {"snapshot": "v@s"})
    with sock:
        started = time.monotonic()
        remote.call_op(str(site.admin_socket), "snapshot.create", {"volume": "v", "name": "t"})
        assert time.monotonic() - started < 5  # not held up by the stalled read
        data = _drain(sock)  # and the read goes on to its end
    assert data.endswith(b'"length": 67108864}}\n') or b'"length":67108864' in data, data[-200:]

    sock = _slow_read(site, {"volume": "v"})
    with sock:
        started = time.monotonic()
        remote.call_op(str(site.admin_socket), "snapshot.create", {"volume": "v", "name": "u"})
        assert time.monotonic() - started < 20  # 10 s of waiting on it, not the whole export
        data = _drain(sock)
    assert b"export a snapshot instead" in data[-1000:], data[-1000:]

    # A reader that pauses now and then (as a disk does) is not given up for it, though
    # other work waits behind the read the whole time.
    image = tmp_path / "big"
    image.write_bytes(os.urandom(256 * MiB))
    site.cli("volume", "import", "big", image)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(site.admin_socket))
    sock.sendall(json.dumps({"v": 1, "call": "read", "params": {"volume": "big"}}).encode()
                 + b"\n")
    queued = threading.Thread(target=remote.call_op, args=(
        str(site.admin_socket), "volume.list", {}), daemon=True)
    with sock:
        sock.settimeout(60)
        got = bytearray(sock.recv(1 << 20))
        queued.start()
        for _ in range(6):  # 3.6 s of pauses in all, each short
            time.sleep(0.6)
            got += sock.recv(1 << 20)
        got += _drain(sock)
    queued.join(timeout=60)
    assert b'"result"' in got[-200:] and b"export a snapshot instead" not in got, got[-300:]
