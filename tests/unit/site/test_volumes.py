"""``site.volumes``: a shrink only when asked for, and raw images only unless told otherwise."""

from __future__ import annotations

import io
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from dvx_dr.errors import IntegrityError, NotFoundError, UserError
from dvx_dr.site import snapshots, volumes
from dvx_dr.site.store import Store

BS = 4096
MiB = 1024 * 1024


def _volume(new_store: Callable[..., Store], size: int = 3 * BS) -> tuple[Store, bytes]:
    store = new_store(encrypted=False, block_size=BS)
    volumes.create(store, "v", size)
    data = random.Random(1).randbytes(size)
    volumes.write(store, "v", 0, io.BytesIO(data))
    return store, data


def _db_state(store: Store) -> list[tuple[object, ...]]:
    return [*store.db.execute("SELECT * FROM volumes"), *store.db.execute("SELECT * FROM blocks"),
            *store.db.execute("SELECT * FROM dirty_leaves"),
            *store.db.execute("SELECT * FROM tree_pages")]


# -- resize -------------------------------------------------------------------------------


def test_a_shrink_without_shrink_is_refused_and_changes_nothing(
        new_store: Callable[..., Store]) -> None:
    """A smaller size cut the volume's tail without a word (a typo lost data)."""
    store, data = _volume(new_store)
    snapshots.create(store, "v", "s")
    before = _db_state(store)
    with pytest.raises(UserError) as err:
        volumes.resize(store, "v", BS + 10)
    assert str(err.value) == (
        f"volume 'v' is {3 * BS} bytes (12.0 KiB); resizing it to {BS + 10} bytes (4.0 KiB) "
        f"would drop its last {2 * BS - 10} bytes; nothing was changed (pass --shrink to "
        "shrink it)")
    assert _db_state(store) == before
    assert volumes.read(store, "v", 0, 3 * BS) == data


def test_a_shrink_with_shrink_drops_the_tail_and_a_grow_needs_no_flag(
        new_store: Callable[..., Store]) -> None:
    store, data = _volume(new_store)
    volumes.resize(store, "v", 5 * BS)
    assert volumes.read(store, "v", 0, 5 * BS) == data + bytes(2 * BS)
    volumes.resize(store, "v", 5 * BS)  # the same size: nothing to drop, nothing to ask
    volumes.resize(store, "v", BS + 10, shrink=True)
    assert volumes.get(store, "v").size == BS + 10
    volumes.resize(store, "v", 2 * BS)
    assert volumes.read(store, "v", 0, 2 * BS) == data[:BS + 10] + bytes(BS - 10)


def test_an_unknown_volume_is_named_before_any_size_question(
        new_store: Callable[..., Store]) -> None:
    store, _ = _volume(new_store)
    with pytest.raises(NotFoundError, match="unknown volume 'nosuch'"):
        volumes.resize(store, "nosuch", 0)


# -- import: container formats ------------------------------------------------------------


def _vdi_header() -> bytes:
    head = bytearray(b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0"))
    head += struct.pack("<I", 0xBEDA107F)
    return bytes(head.ljust(512, b"\0"))


CONTAINERS = {
    "qcow2": b"QFI\xfb\0\0\0\x03" + bytes(504) + b"data" * 1024,
    "qcow": b"QFI\xfb\0\0\0\x01" + bytes(504) + b"data" * 1024,
    "VMDK": b"KDMV\x01\0\0\0" + bytes(504) + b"data" * 1024,
    "VHDX": b"vhdxfile" + "dvx-dr".encode("utf-16-le") + bytes(4096),
    "VDI": _vdi_header() + b"data" * 1024,
    # A fixed VHD is raw data followed by its 512-byte footer; a dynamic one copies the
    # footer at its start too.
    "VHD": b"data" * 1024 + b"conectix" + bytes(504),
}


@pytest.mark.parametrize(("kind", "image"), CONTAINERS.items(), ids=CONTAINERS)
def test_image_format_knows_containers_by_their_magic(kind: str, image: bytes) -> None:
    source = io.BytesIO(image)
    assert volumes.image_format(source, len(image)) == kind
    assert source.tell() == 0


@pytest.mark.parametrize("image", [
    b"", b"QFI", bytes(MiB), random.Random(2).randbytes(4096),
    b"<<< not a VDI: no magic at 64 >>>".ljust(512, b"\0"),
    b"the word conectix in the middle of a disk".ljust(4096, b"\0"),
    b"KDM" + bytes(509),
], ids=["empty", "short", "zeros", "random", "vdi-text-only", "conectix-inside", "kdm"])
def test_image_format_takes_other_bytes_as_raw(image: bytes) -> None:
    assert volumes.image_format(io.BytesIO(image), len(image)) is None


def test_a_vmdk_descriptor_and_an_old_vhd_footer_are_known() -> None:
    descriptor = b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
    assert volumes.image_format(io.BytesIO(descriptor), len(descriptor)) == "VMDK"
    old_vhd = bytes(4096) + b"conectix" + bytes(503)  # a 511-byte footer
    assert volumes.image_format(io.BytesIO(old_vhd), len(old_vhd)) == "VHD"


def _qcow2(tmp_path: Path) -> tuple[Path, bytes]:
    """A real (small) qcow2 made by qemu-img from a raw image of known content."""
    raw = tmp_path / "disk.raw"
    content = random.Random(3).randbytes(MiB)
    raw.write_bytes(content)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True, capture_output=True)
    return qcow2, content


def test_import_of_a_qcow2_is_refused_and_leaves_no_volume(
        new_store: Callable[..., Store], tmp_path: Path) -> None:
    """A qcow2 container was imported as a raw disk: its header and its tables became the
    'disk', which no guest can boot."""
    store = new_store(encrypted=False, block_size=BS)
    qcow2, _ = _qcow2(tmp_path)
    with pytest.raises(UserError) as err:
        volumes.import_file(store, "vm", qcow2)
    assert str(err.value) == (
        f"{qcow2} is a qcow2 image, not a raw disk; convert it first: qemu-img convert -O "
        f"raw {qcow2} {qcow2}.raw (or pass --any-format to import its bytes as they are)")
    assert store.db.execute("SELECT COUNT(*) FROM volumes").fetchone()[0] == 0
    assert store.db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] == 0


def test_import_with_any_format_takes_the_bytes_as_they_are(
        new_store: Callable[..., Store], tmp_path: Path) -> None:
    store = new_store(encrypted=False, block_size=BS)
    qcow2, _ = _qcow2(tmp_path)
    size = volumes.import_file(store, "vm", qcow2, any_format=True)
    assert size == qcow2.stat().st_size
    assert volumes.read(store, "vm", 0, size) == qcow2.read_bytes()


def test_the_suggested_command_is_quoted_for_the_shell(
        new_store: Callable[..., Store], tmp_path: Path) -> None:
    store = new_store(encrypted=False, block_size=BS)
    odd = tmp_path / "my disk's.vmdk"
    odd.write_bytes(CONTAINERS["VMDK"])
    with pytest.raises(UserError) as err:
        volumes.import_file(store, "vm", odd)
    assert "is a VMDK image" in str(err.value)
    assert "qemu-img convert -O raw '" in str(err.value)
    assert "'\"'\"'" in str(err.value)  # the quote inside the name, escaped


def test_a_raw_image_imports_as_before(new_store: Callable[..., Store],
                                       tmp_path: Path) -> None:
    store = new_store(encrypted=False, block_size=BS)
    _, content = _qcow2(tmp_path)
    (tmp_path / "disk.raw").write_bytes(content)
    volumes.import_file(store, "vm", tmp_path / "disk.raw")
    assert volumes.read(store, "vm", 0, MiB) == content


def test_a_map_naming_a_blob_that_is_not_a_block_fails_the_read(
        new_store: Callable[..., Store]) -> None:
    """Reads had looped for ever on a short block (and shifted the data after it): such a
    tree could only come from a peer that lied, which the target now refuses too."""
    store, _ = _volume(new_store)
    info = volumes.get(store, "v")
    with store.transaction() as db:
        _, (row,) = store.blobs.put_many([b"a hundred bytes".ljust(100, b".")])
        db.execute("UPDATE blocks SET blob=? WHERE vol=? AND blk=1", (row, info.id))
        db.execute("INSERT OR IGNORE INTO dirty_blocks (vol, blk) VALUES (?, 1)", (info.id,))
    with pytest.raises(IntegrityError, match="names a blob of 100 bytes as a block"):
        volumes.read(store, "v", 0, 3 * BS)
    snapshots.create(store, "v", "s1")
    with pytest.raises(IntegrityError, match="names a blob of 100 bytes as a block"):
        snapshots.read(store, "v@s1", 0, 3 * BS)
