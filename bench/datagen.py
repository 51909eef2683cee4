"""Deterministic generator of a VM-disk-image-like raw file, for benchmarks.

The image is laid out the way a filesystem fills a disk: a sequence of 4 KiB-aligned regions, each
of one kind, with sizes drawn per kind (small config files, larger binaries and media, long runs of
unallocated space). The byte mix targets:

========  =====  ==========================================================================
kind      share  content
========  =====  ==========================================================================
text       25%   config files, logs and source code built from a vocabulary (zstd ~3-4x)
binary     20%   machine-code-like: skewed byte distribution, instruction patterns and
                 symbol strings, remapped per slice so no two regions share long runs (~1.5-2x)
zero       25%   unallocated space: runs from 4 KiB to tens of MiB, most bytes in runs >= 1 MiB
random     15%   incompressible data (media, archives, already-compressed files)
repeat     15%   copies of earlier content (duplicated files, packages installed twice): each
                 copy starts at a 64 KiB-aligned offset of an earlier region and is 64 KiB to
                 8 MiB long. Half of the copies land on a 64 KiB-aligned offset, so a fixed
                 64 KiB-block store deduplicates them; the other half land on an offset that is
                 4 KiB- but not 64 KiB-aligned, which a fixed-block store cannot deduplicate and
                 content-defined chunking (restic) can, apart from the chunks at a copy's ends.
                 That half favours content-defined chunking.
========  =====  ==========================================================================

File-like regions (text, binary, random) end at an arbitrary byte and are zero-padded to the next
4 KiB boundary, like the slack of a file's last block.

Nothing is held whole in memory: regions are produced in pieces of at most 1 MiB and written
straight to the file; copies are read back from the file being written; zero runs are left as holes
(a sparse file, like a thin raw image; they read back as zeros). The only other state is a few
pools built from the seed (about 25 MB; the process peaks near 60 MB whatever the image size).
Generation uses only the standard library (``random.Random`` and its ``randbytes``,
``bytes.translate``, ``bytes.join``) and runs at 300-600 MB/s on a 2-vCPU VM, bounded there by
the filesystem's block allocation and CPU contention more than by the generator.

Text is a random sequence of snippets (1-4 lines, each line a random start + a random end drawn
from per-style pools); binary is slices of a 4 MiB machine-code-like pool at random offsets, each
passed through one of 256 tables that change a few byte values. So the same seed gives the same
bytes, while no 64 KiB block and no restic chunk (512 KiB-8 MiB) of generated data recurs anywhere
else in the image, except where the ``repeat`` kind puts it on purpose.

``generate(path, size, seed)`` writes an image; ``mutate(path, fraction, seed)`` overwrites a
fraction of its 64 KiB blocks with fresh content of the same mix, for incremental benchmarks.

CLI: ``python bench/datagen.py OUT --size 1GiB --seed 1 [--stats]``, or
``python bench/datagen.py OUT --mutate 0.05 --seed 2`` to mutate an existing image.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import operator
import os
import random
import re
import sys
import time
from array import array
from collections.abc import Iterator
from pathlib import Path

# Bump when the byte stream produced for a given (size, seed) changes, so cached images are rebuilt.
GENERATOR_VERSION = 1

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
PAGE = 4 * KIB
BLOCK = 64 * KIB
PIECE = 1 * MIB  # the largest buffer produced or written at once

MIX: dict[str, float] = {
    "text": 0.25,
    "binary": 0.20,
    "zero": 0.25,
    "random": 0.15,
    "repeat": 0.15,
}

# Region size ranges per kind (bytes, drawn log-uniformly, then rounded to 4 KiB).
_SIZES: dict[str, tuple[int, int]] = {
    "text": (4 * KIB, 1 * MIB),
    "binary": (16 * KIB, 8 * MIB),
    "random": (64 * KIB, 16 * MIB),
    "repeat": (64 * KIB, 8 * MIB),
}
_ZERO_SMALL = (4 * KIB, 256 * KIB)  # free-space fragments between files
_ZERO_LARGE = (1 * MIB, 64 * MIB)  # unallocated stretches
_ZERO = bytes(PIECE)

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": KIB, "mib": MIB, "gib": GIB, "tib": 1024 * GIB,
}  # fmt: skip


def parse_size(text: str) -> int:
    """``"1GiB"`` -> 1073741824; decimal (MB) and binary (MiB) units, or a bare byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like 256MiB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------


def _wordlist(text: str) -> list[str]:
    return text.split()


_WORDS = _wordlist("""
the of and to in is for on with that by this be are from at as it or an not was have has
all new can will if but when more no other one all any each file system error user server
service request response failed success started stopped connection timeout session client
data value config default path status update install package version module kernel device
network address interface port host local remote process thread memory cache buffer disk
read write open close create delete start stop load save check enable disable allow deny
option param setting level debug info warning notice critical message event handler queue
worker job task schedule time date size count limit max min total used free available
""")

_TECH = _wordlist("""
systemd sshd cron nginx apache2 postgres mysqld dockerd containerd kubelet NetworkManager
dbus-daemon rsyslogd polkitd udevd auditd chronyd snapd packagekitd gdm3 pulseaudio
eth0 ens3 lo wlan0 br0 docker0 veth tcp udp ipv4 ipv6 dhcp dns ntp tls ssl http https
uid gid pid tty pts root admin www-data nobody daemon bin sys sync mail proxy backup
usr lib etc var opt srv tmp run boot home share local include x86_64-linux-gnu python3
libc libssl libcrypto libz libpthread libm libdl libstdc++ libgcc_s libsystemd libudev
""")

_CODE_KW = _wordlist("""
if else for while return break continue switch case default struct union enum typedef
static const void int char long unsigned size_t uint32_t uint64_t bool true false NULL
def class import from self None True False try except finally raise with yield lambda
function var let const async await new this null undefined public private protected
""")

_SYLLABLES = _wordlist("""
get set init read write parse load save alloc free open close send recv lock unlock
buf len ptr ctx cfg req resp node list map hash key val item elem entry table index
dev net io fs mem proc task sched irq dma page block inode dentry sock skb pkt msg
""")

_MONTHS = _wordlist("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec")


def _zipf_cum(n: int, s: float = 1.05) -> list[float]:
    return list(itertools.accumulate(1.0 / (i + 1) ** s for i in range(n)))


def _draws(rng: random.Random, population: list[str], cum: list[float]) -> Iterator[str]:
    """An endless stream of Zipf-weighted draws, drawn in batches (one call per item is slow)."""
    while True:
        yield from rng.choices(population, cum_weights=cum, k=4096)


def _indices(rng: random.Random, k: int) -> array[int]:
    """``k`` uniform indices in [0, 65536), made in C from one ``randbytes`` call."""
    idx = array("H", rng.randbytes(2 * k))
    if sys.byteorder == "big":  # same bytes on every platform
        idx.byteswap()
    return idx


class _Pools:
    """Everything precomputed from the seed: text snippets per style, a binary pool."""

    TEXT_HALVES = 4096  # line starts and line ends per style (divides 65536)
    TEXT_SNIPPETS = 32768  # snippets of 1-4 lines per style
    BINARY_POOL = 4 * MIB

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"dvx-bench-pools-{seed}")
        idents = sorted(
            {rng.choice(_SYLLABLES) + sep + rng.choice(_SYLLABLES) for sep in ("_", "") * 600}
        )
        rng.shuffle(idents)
        vocab = _WORDS + _TECH + _CODE_KW + idents
        rng.shuffle(vocab)
        self._word = _draws(rng, vocab, _zipf_cum(len(vocab)))
        self._id = _draws(rng, idents, _zipf_cum(len(idents)))
        self._hosts = [
            f"{rng.choice(['web', 'db', 'app', 'node'])}{rng.randrange(1, 40):02d}"
            for _ in range(8)
        ]
        self._procs = [f"{rng.choice(_TECH[:20])}[{rng.randrange(300, 40000)}]" for _ in range(40)]
        # Per style, a pool of text snippets of 1-4 lines, each line a random start + a random
        # end; the pool is repeated up to 65536 entries so that a 16-bit random index picks
        # uniformly without any per-item Python code.
        self.text: dict[str, list[bytes]] = {}
        self.avg_snippet: dict[str, float] = {}
        for style in ("log", "config", "code"):
            make_start = getattr(self, f"_{style}_start")
            make_end = getattr(self, f"_{style}_end")
            starts = [make_start(rng).encode() for _ in range(self.TEXT_HALVES)]
            ends = [make_end(rng).encode() for _ in range(self.TEXT_HALVES)]
            reps = 65536 // self.TEXT_HALVES
            starts, ends = starts * reps, ends * reps
            snippets: list[bytes] = []
            for _ in range(self.TEXT_SNIPPETS // 4096):  # in batches, to bound memory
                count = rng.choices(range(1, 5), k=4096)  # lines per snippet
                cuts = list(itertools.accumulate(count, initial=0))
                lines = list(
                    map(
                        operator.add,
                        map(starts.__getitem__, _indices(rng, cuts[-1])),
                        map(ends.__getitem__, _indices(rng, cuts[-1])),
                    )
                )
                snippets += [b"".join(lines[a:b]) for a, b in itertools.pairwise(cuts)]
            self.text[style] = snippets * (65536 // len(snippets))
            self.avg_snippet[style] = sum(map(len, snippets)) / len(snippets)
        self.text_styles = list(self.text)
        self.strings = [self.ident().encode() + b"\x00" for _ in range(256)]
        self.binary = self._make_binary(rng)
        self.remaps = self._make_remaps(rng)

    # -- text ---------------------------------------------------------------------------------

    def words(self, n: int) -> str:
        return " ".join(itertools.islice(self._word, n))

    def ident(self) -> str:
        return next(self._id)

    def _number(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.5:
            return str(rng.randrange(100))
        if r < 0.8:
            return str(rng.randrange(100_000))
        if r < 0.9:
            return f"0x{rng.getrandbits(32):08x}"
        return f"{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}.1"

    def _log_start(self, rng: random.Random) -> str:
        return (
            f"{rng.choice(_MONTHS)} {rng.randint(1, 28):2d} {rng.randrange(24):02d}:"
            f"{rng.randrange(60):02d}:{rng.randrange(60):02d} {rng.choice(self._hosts)} "
            f"{rng.choice(self._procs)}: "
        )

    def _log_end(self, rng: random.Random) -> str:
        r = rng.random()
        msg = self.words(rng.randint(2, 9))
        if r < 0.4:
            msg += f" {self.ident()}={self._number(rng)}"
        elif r < 0.6:
            msg += f" (code {self._number(rng)})"
        return msg + "\n"

    def _config_start(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.15:
            return "# " + self.words(rng.randint(2, 6))
        if r < 0.2:
            return f"[{self.ident()}"
        indent = rng.choice(["", "", "    ", "\t"])
        return f"{indent}{self.ident()}{rng.choice([' = ', '=', ': ', ' '])}"

    def _config_end(self, rng: random.Random) -> str:
        r = rng.random()
        if r < 0.3:
            v = self._number(rng)
        elif r < 0.5:
            v = "/" + "/".join(rng.choices(_TECH, k=rng.randint(1, 4)))
        elif r < 0.65:
            v = rng.choice(["yes", "no", "true", "false", "on", "off", "auto"])
        else:
            v = self.words(rng.randint(1, 4))
        return v + "\n"

    def _code_start(self, rng: random.Random) -> str:
        indent = "    " * min(4, int(rng.expovariate(0.8)))
        i = self.ident
        match rng.randrange(9):
            case 0:
                head = f"if ({i()} {rng.choice(['==', '!=', '<', '>='])} "
            case 1:
                head = f"{i()} = {i()}("
            case 2:
                head = "return "
            case 3:
                head = f"for (i = 0; i < {i()}; i++) "
            case 4:
                head = f"def {i()}(self, "
            case 5:
                head = f"static int {i()}(struct {i()} *"
            case 6:
                head = "/* "
            case 7:
                head = "// "
            case _:
                head = f"{i()}->{i()} = "
        return indent + head

    def _code_end(self, rng: random.Random) -> str:
        i = self.ident
        match rng.randrange(8):
            case 0:
                return f"{i()}) {{\n"
            case 1:
                return f"{i()}, {self._number(rng)});\n"
            case 2:
                return f"{i()};\n"
            case 3:
                return f"{self.words(rng.randint(2, 7))} */\n"
            case 4:
                return f"{i()}):\n"
            case 5:
                return "NULL;\n"
            case 6:
                return f"{i()}[{self._number(rng)}];\n"
            case _:
                return "}\n"

    def text_piece(self, rng: random.Random, style: str, n: int) -> bytes:
        """``n`` bytes of text in one style: a random sequence of snippets."""
        snippets = self.text[style]
        out: list[bytes] = []
        have = 0
        while have < n:
            k = int((n - have) / self.avg_snippet[style]) + 8
            out.append(b"".join(map(snippets.__getitem__, _indices(rng, k))))
            have += len(out[-1])
        return b"".join(out)[:n] if len(out) > 1 else out[0][:n]

    # -- binary -------------------------------------------------------------------------------

    def _make_binary(self, rng: random.Random) -> bytes:
        # Skewed single-byte distribution of x86-64 code: many 00/FF, REX prefixes, MOV/CALL/JMP.
        heavy = {0x00: 56, 0xFF: 10, 0x48: 12, 0x89: 9, 0x8B: 8, 0xE8: 5, 0x0F: 6, 0x24: 5,
                 0x01: 4, 0x44: 5, 0x4C: 4, 0x85: 4, 0xC0: 4, 0x45: 4, 0x83: 4, 0xC3: 2,
                 0x74: 3, 0x75: 3, 0xEB: 2, 0x8D: 4}  # fmt: skip
        table = bytearray()
        for b, w in heavy.items():
            table += bytes([b]) * w
        table += rng.randbytes(256 - len(table))
        skew = bytes(table)
        fixed = [
            b"\x55\x48\x89\xe5", b"\x48\x83\xec\x20", b"\x48\x8b\x45\xf8", b"\x48\x89\x7d\xf8",
            b"\xc9\xc3", b"\x0f\x1f\x44\x00\x00", b"\x66\x0f\x1f\x44\x00\x00", b"\xcc" * 8,
            b"\x31\xc0", b"\x48\x85\xc0", b"\x0f\x84", b"\x0f\x85", b"\x41\x57\x41\x56",
            b"\x5d\xc3", b"\x90" * 4, b"\xf3\x0f\x1e\xfa",
        ]  # fmt: skip
        patterns = fixed + [rng.randbytes(rng.randint(3, 10)).translate(skew) for _ in range(400)]
        # Runs of 1-3 instruction patterns, now and then a symbol string.
        extras = [b"".join(rng.choices(patterns, k=rng.randint(1, 3))) for _ in range(4000)]
        extras += self.strings
        # Alternate skewed noise (6-24 bytes) with an extra, in 256 KiB parts to bound memory.
        parts: list[bytes] = []
        part = 256 * KIB
        for _ in range(self.BINARY_POOL // part):
            count = part // 20
            cuts = list(itertools.accumulate(rng.choices(range(6, 25), k=count), initial=0))
            noise = rng.randbytes(cuts[-1]).translate(skew)
            pieces = map(noise.__getitem__, itertools.starmap(slice, itertools.pairwise(cuts)))
            mixed = b"".join(
                itertools.chain.from_iterable(
                    zip(pieces, rng.choices(extras, k=count), strict=True)
                )
            )
            assert len(mixed) >= part
            parts.append(mixed[:part])
        return b"".join(parts)

    def _make_remaps(self, rng: random.Random) -> list[bytes]:
        # Translation tables that each change 8 of the 256 byte values (~3-4% of the bytes of
        # the pool): the same pool stretch comes out differently under each, which breaks long
        # repeats while keeping most of its structure.
        tables = []
        for _ in range(256):
            table = bytearray(range(256))
            for value in rng.sample(range(256), 8):
                table[value] = rng.randrange(256)
            tables.append(bytes(table))
        return tables

    def binary_piece(self, rng: random.Random, n: int) -> bytes:
        """``n`` bytes: slices of the binary pool at random offsets, each through a remap table."""
        parts: list[bytes] = []
        have = 0
        while have < n:
            k = min(n - have, rng.randint(4 * KIB, 64 * KIB))
            a = rng.randrange(self.BINARY_POOL - k + 1)
            parts.append(self.binary[a : a + k].translate(rng.choice(self.remaps)))
            have += k
        return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _round_page(n: int) -> int:
    return max(PAGE, n // PAGE * PAGE)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _ImageWriter:
    def __init__(self, fd: int, size: int, seed: int) -> None:
        self.fd = fd
        self.size = size
        self.pos = 0
        self.rng = random.Random(f"dvx-bench-layout-{seed}")
        self.pools = _Pools(seed)
        self.emitted = dict.fromkeys(MIX, 0)
        self.copies = {"aligned": 0, "unaligned": 0}
        # Original content regions (start, end) that copies may be taken from.
        self.sources: list[tuple[int, int]] = []
        self.source_bytes = 0
        self.max_region = max(PAGE, _round_page(size // 16))

    # -- content ------------------------------------------------------------------------------

    def _file_pieces(self, kind: str, length: int) -> Iterator[bytes]:
        """A file of ``length`` content bytes (a text file keeps one style throughout)."""
        style = self.rng.choice(self.pools.text_styles)
        left = length
        while left > 0:
            n = min(left, PIECE)
            if kind == "text":
                yield self.pools.text_piece(self.rng, style, n)
            elif kind == "binary":
                yield self.pools.binary_piece(self.rng, n)
            else:
                yield self.rng.randbytes(n)
            left -= n

    def _emit_file(self, kind: str, size: int) -> None:
        start = self.pos
        slack = self.rng.randrange(PAGE) if size > PAGE else self.rng.randrange(PAGE // 2)
        for piece in self._file_pieces(kind, size - slack):
            _write_all(self.fd, piece)
        if slack:
            _write_all(self.fd, _ZERO[:slack])
        self.pos += size
        self.emitted[kind] += size
        if size >= BLOCK:
            self.sources.append((start, start + size))
            self.source_bytes += size

    def _emit_zero(self, size: int) -> None:
        os.lseek(self.fd, size, os.SEEK_CUR)  # a hole, as in a sparse raw image
        self.pos += size
        self.emitted["zero"] += size

    def _emit_copy(self, size: int) -> bool:
        """Copy a 64 KiB-aligned stretch of one earlier content region; False if none found."""
        for _ in range(16):
            start, end = self.rng.choice(self.sources)
            first = -(-start // BLOCK) * BLOCK
            if end - first >= BLOCK:
                break
        else:
            return False
        src = first + self.rng.randrange((end - first) // BLOCK) * BLOCK
        size = min(size, (end - src) // PAGE * PAGE)
        left, off = size, src
        while left > 0:
            n = min(left, PIECE)
            data = os.pread(self.fd, n, off)
            assert len(data) == n
            _write_all(self.fd, data)
            left -= n
            off += n
        self.copies["aligned" if self.pos % BLOCK == 0 else "unaligned"] += size
        self.pos += size
        self.emitted["repeat"] += size
        return True

    # -- layout -------------------------------------------------------------------------------

    def _deficits(self, ahead: int) -> dict[str, float]:
        """Bytes each kind lacks for its share of the image up to ``ahead`` bytes from here."""
        horizon = self.pos + ahead
        deficits = {kind: share * horizon - self.emitted[kind] for kind, share in MIX.items()}
        if self.source_bytes < 2 * MIB:
            deficits["repeat"] = 0.0  # nothing worth copying yet
        return deficits

    def _pick_kind(self, deficits: dict[str, float]) -> str:
        weights = [max(d, 0.0) for d in deficits.values()]
        if not any(weights):
            weights = list(MIX.values())
        return self.rng.choices(list(MIX), weights=weights)[0]

    def _region_size(self, kind: str, deficit: float) -> int:
        if kind == "zero":
            lo, hi = _ZERO_LARGE if self.rng.random() < 0.5 else _ZERO_SMALL
        else:
            lo, hi = _SIZES[kind]
        size = _round_page(_log_uniform(self.rng, lo, hi))
        # Never overshoot a kind's share by more than one of its smallest regions.
        size = min(size, max(lo, _round_page(int(deficit))))
        return min(size, self.max_region, self.size - self.pos)

    def run(self) -> None:
        while self.pos < self.size:
            left = self.size - self.pos
            if left < PAGE:  # only when size is not a multiple of 4 KiB
                self._emit_zero(left)
                break
            # Pick a kind by what it lacks now; size it by what it lacks a region size ahead.
            kind = self._pick_kind(self._deficits(MIB))
            size = self._region_size(kind, self._deficits(self.max_region)[kind])
            if kind == "repeat":
                # Half the copies land 64 KiB-aligned, half 4 KiB- but not 64 KiB-aligned; fill
                # the gap with a small file.
                want_aligned = self.rng.random() < 0.5
                gap = -self.pos % BLOCK if want_aligned else 0
                if not want_aligned and self.pos % BLOCK == 0:
                    gap = self.rng.randrange(1, BLOCK // PAGE) * PAGE
                gap = min(gap, left)
                if gap:
                    self._emit_file(self.rng.choice(["text", "binary"]), gap)
                    size = min(size, self.size - self.pos)
                if size and not (size >= BLOCK and self._emit_copy(size)):
                    self._emit_file("binary", size)  # too little room left for a copy
            elif kind == "zero":
                self._emit_zero(size)
            else:
                self._emit_file(kind, size)


def generate(path: Path, size: int, seed: int = 1) -> None:
    """Write a ``size``-byte image to ``path`` (overwritten); same (size, seed), same bytes."""
    _generate(path, size, seed)


def _generate(path: Path, size: int, seed: int) -> _ImageWriter:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        writer = _ImageWriter(fd, size, seed)
        writer.run()
        assert writer.pos == size
        os.ftruncate(fd, size)  # in case the image ends in a hole
    finally:
        os.close(fd)
    return writer


def mutate(path: Path, fraction: float, seed: int, block_size: int = BLOCK) -> int:
    """Overwrite ``fraction`` of the ``block_size`` blocks of ``path`` in place.

    Each chosen block gets fresh content of one kind drawn with the image's mix (a ``repeat``
    block is a copy of another block of the image, 64 KiB-aligned half of the time). A block is
    regenerated until it differs from what it held, so every chosen block really changes.
    Returns the number of bytes overwritten (chosen blocks x their length).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    size = path.stat().st_size
    nblocks = -(-size // block_size)
    rng = random.Random(f"dvx-bench-mutate-{seed}")
    pools = _Pools(seed)
    chosen = sorted(rng.sample(range(nblocks), round(fraction * nblocks)))
    kinds = list(MIX)
    weights = [MIX[k] for k in kinds]
    changed = 0
    fd = os.open(path, os.O_RDWR)
    try:
        for index in chosen:
            off = index * block_size
            n = min(block_size, size - off)
            old = os.pread(fd, n, off)
            for attempt in range(8):
                kind = rng.choices(kinds, weights=weights)[0] if attempt < 7 else "random"
                if kind == "text":
                    new = pools.text_piece(rng, rng.choice(pools.text_styles), n)
                elif kind == "binary":
                    new = pools.binary_piece(rng, n)
                elif kind == "random":
                    new = rng.randbytes(n)
                elif kind == "zero":
                    new = bytes(n)
                else:
                    align = BLOCK if rng.random() < 0.5 else PAGE
                    src = rng.randrange(max(1, (size - n) // align + 1)) * align
                    new = os.pread(fd, n, src)
                    new += bytes(n - len(new))
                if new != old:
                    break
            _write_all_at(fd, new, off)
            changed += n
    finally:
        os.close(fd)
    return changed


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


# --------------------------------------------------------------------------------------------
# Statistics (the CLI's --stats; needs the zstandard module for the compression figures)
# --------------------------------------------------------------------------------------------


def analyze(path: Path, block_size: int = BLOCK, level: int = 3) -> dict[str, float]:
    """What a fixed-block dedup + per-block zstd store sees: zero, duplicate and unique blocks.

    ``zstd_ratio`` is the compression of the unique non-zero blocks (each compressed alone, as a
    block store does); ``reduction`` is image size / bytes such a store would keep.
    """
    try:
        import zstandard

        cctx: zstandard.ZstdCompressor | None = zstandard.ZstdCompressor(level=level)
    except ImportError:  # without zstandard, only the dedup figures
        cctx = None
    seen: set[bytes] = set()
    total = zero = dup = unique_bytes = compressed = 0
    with open(path, "rb") as f:
        while block := f.read(block_size):
            total += 1
            if block.count(0) != len(block):
                digest = hashlib.blake2b(block, digest_size=16).digest()
                if digest in seen:
                    dup += 1
                    continue
                seen.add(digest)
                unique_bytes += len(block)
                if cctx is not None:
                    compressed += min(len(cctx.compress(block)), len(block))
            else:
                zero += 1
    size = path.stat().st_size
    stats: dict[str, float] = {
        "blocks": total,
        "zero_block_fraction": zero / total,
        "duplicate_block_fraction": dup / total,
        "unique_bytes": unique_bytes,
    }
    if cctx is not None and compressed:
        stats["zstd_ratio"] = unique_bytes / compressed
        stats["reduction"] = size / compressed
    return stats


def kind_ratios(seed: int = 1, sample: int = 8 * MIB, level: int = 3) -> dict[str, float]:
    """zstd ratio (per 64 KiB block) of each generated content kind, on a fresh sample."""
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level)
    pools = _Pools(seed)
    rng = random.Random(seed)
    samples = {
        "text": b"".join(pools.text_piece(rng, s, sample // 3) for s in pools.text_styles),
        "binary": pools.binary_piece(rng, sample),
        "random": rng.randbytes(sample),
    }
    ratios: dict[str, float] = {}
    for style in pools.text_styles:
        samples[f"text:{style}"] = pools.text_piece(rng, style, sample // 3)
    for kind, data in samples.items():
        blocks = [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]
        packed = sum(min(len(cctx.compress(b)), len(b)) for b in blocks)
        ratios[kind] = len(data) / packed
    return ratios


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="image file to write (or mutate)")
    parser.add_argument("--size", type=parse_size, default=GIB, help="image size (default 1GiB)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mutate",
        type=float,
        metavar="FRACTION",
        help="instead of generating, overwrite this fraction of OUT's 64 KiB blocks",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print the content mix and what a 64 KiB dedup+zstd store would see",
    )
    args = parser.parse_args(argv)

    if args.mutate is not None:
        t0 = time.perf_counter()
        changed = mutate(args.out, args.mutate, args.seed)
        print(f"mutated {changed} bytes of {args.out} in {time.perf_counter() - t0:.2f} s")
    else:
        t0 = time.perf_counter()
        writer = _generate(args.out, args.size, args.seed)
        seconds = time.perf_counter() - t0
        print(
            f"wrote {args.size} bytes to {args.out} in {seconds:.2f} s "
            f"({args.size / seconds / 1e6:.0f} MB/s)"
        )
        if args.stats:
            mix = ", ".join(f"{k} {v / args.size:.1%}" for k, v in writer.emitted.items())
            print(f"mix: {mix}")
            print(
                f"copies: {writer.copies['aligned'] / MIB:.1f} MiB 64 KiB-aligned, "
                f"{writer.copies['unaligned'] / MIB:.1f} MiB only 4 KiB-aligned"
            )
    if args.stats:
        ratios = kind_ratios(args.seed)
        print(
            "zstd-3 per 64 KiB block by kind: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        )
        st = analyze(args.out)
        print(
            f"image: {int(st['blocks'])} blocks of 64 KiB; zero {st['zero_block_fraction']:.1%}, "
            f"duplicate {st['duplicate_block_fraction']:.1%}; unique non-zero blocks compress "
            f"{st.get('zstd_ratio', float('nan')):.2f}x; fixed-block dedup+zstd reduction "
            f"{st.get('reduction', float('nan')):.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
