"""Known-answer and tamper tests for the store's on-disk formats and ciphers: the extent
header, the extent cipher (AES-256-XTS), the index keys, the keystore file and the snapshot
root."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from dvx_dr.errors import FormatError, IntegrityError, UserError, WrongPasswordError
from dvx_dr.site import extent
from dvx_dr.site import keystore as keystore_module
from dvx_dr.site.crypto import ExtentCipher, IndexKeys, PlainIndex, new_tek
from dvx_dr.site.kdf import KekDerivation
from dvx_dr.site.keystore import KeyMaterial, Keystore
from dvx_dr.site.tree import Root

# -- extent header ------------------------------------------------------------------------

#: flags = compressed | encrypted, key version 7, payload 10 bytes -> stored 16 (one AES block)
HEADER_KAT = bytes.fromhex("4458" "01" "03" "07000000" "0a000000" "10000000")


def test_extent_header_known_bytes() -> None:
    packed = extent.pack_header(extent.FLAG_COMPRESSED | extent.FLAG_ENCRYPTED, 7, 10)
    assert packed == HEADER_KAT
    assert extent.HEADER_SIZE == len(packed) == 16
    h = extent.unpack_header(packed + bytes(16), "here")
    assert (h.flags, h.key_version, h.payload_len, h.stored_len) == (3, 7, 10, 16)
    assert h.compressed and h.encrypted
    assert h.total_len == 32


def test_extent_header_plain_stores_payload_length() -> None:
    packed = extent.pack_header(0, 0, 70_000)
    assert packed == bytes.fromhex("4458" "01" "00" "00000000" "70110100" "70110100")
    h = extent.unpack_header(packed, "here")
    assert not h.compressed and not h.encrypted
    assert h.stored_len == h.payload_len == 70_000


def test_extent_header_rejects_payload_over_one_xts_data_unit() -> None:
    extent.pack_header(extent.FLAG_ENCRYPTED, 1, extent.MAX_STORED)
    with pytest.raises(ValueError, match="XTS data unit"):
        extent.pack_header(extent.FLAG_ENCRYPTED, 1, extent.MAX_STORED + 1)


def test_extent_header_truncated() -> None:
    with pytest.raises(IntegrityError, match="segment 3 offset 9: extent header is truncated"):
        extent.unpack_header(HEADER_KAT[:15], "segment 3 offset 9")


def test_extent_header_bad_magic() -> None:
    with pytest.raises(IntegrityError, match="bad magic"):
        extent.unpack_header(b"XD" + HEADER_KAT[2:], "here")


def test_extent_header_unknown_version_is_named() -> None:
    data = HEADER_KAT[:2] + bytes([9]) + HEADER_KAT[3:]
    with pytest.raises(FormatError, match="extent format version 9 is not known"):
        extent.unpack_header(data, "here")


@pytest.mark.parametrize("flags", [0x04, 0x80, 0x07])
def test_extent_header_unknown_flags(flags: int) -> None:
    data = HEADER_KAT[:3] + bytes([flags]) + HEADER_KAT[4:]
    with pytest.raises(IntegrityError, match=f"unknown flags {flags:#x}"):
        extent.unpack_header(data, "here")


@pytest.mark.parametrize("flags, payload, stored", [
    (extent.FLAG_ENCRYPTED, 10, 10),        # encrypted short payload must be padded to 16
    (0, 10, 16),                            # plain payload is never padded
    (extent.FLAG_COMPRESSED, 100, 99),      # stored shorter than the payload
    (0, extent.MAX_STORED + 1, extent.MAX_STORED + 1),  # over one XTS data unit
])
def test_extent_header_inconsistent_lengths(flags: int, payload: int, stored: int) -> None:
    data = extent.HEADER.pack(extent.MAGIC, extent.VERSION, flags, 1, payload, stored)
    with pytest.raises(IntegrityError, match="lengths are inconsistent"):
        extent.unpack_header(data, "here")


def test_pad_to_one_aes_block() -> None:
    assert extent.pad(b"abc") == b"abc" + bytes(13)
    assert extent.pad(bytes(16)) == bytes(16)
    assert extent.pad(b"x" * 40) == b"x" * 40


# -- extent cipher (AES-256-XTS) ----------------------------------------------------------

KEY = bytes(range(64))
PLAIN = b"dvx-dr extent cipher known-answer test, 48 bytes"
#: ExtentCipher({1: KEY}).encrypt(1, segment 3, offset 4096, PLAIN), computed once and pinned.
CIPHER_KAT = bytes.fromhex(
    "88efd34b60dfcde938e836e8447ef8bc2b6e77d622520df08641144898441f75"
    "f9dbb8654500a5762afd0045c69b7493")


def _xts_reference(key: bytes, segment: int, offset: int, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.XTS(struct.pack("<QQ", segment, offset))).encryptor()
    return enc.update(data) + enc.finalize()


def test_extent_cipher_known_answer() -> None:
    cipher = ExtentCipher({1: KEY})
    out = cipher.encrypt(1, 3, 4096, PLAIN)
    assert out == CIPHER_KAT
    assert out == _xts_reference(KEY, 3, 4096, PLAIN)
    assert cipher.decrypt(1, 3, 4096, out) == PLAIN


def test_extent_cipher_ieee_1619_vector_10() -> None:
    """IEEE P1619 XTS-AES-256 vector 10 (data unit 0xff): the tweak of segment 0xff,
    offset 0 is that data unit number, little-endian."""
    key = bytes.fromhex("2718281828459045235360287471352662497757247093699959574966967627"
                        "3141592653589793238462643383279502884197169399375105820974944592")
    head = ExtentCipher({1: key}).encrypt(1, 0xFF, 0, bytes(range(32)))
    assert head == bytes.fromhex(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b")


def test_extent_cipher_tweak_uses_both_halves_of_the_address() -> None:
    seg, off = 0x0102030405060708, 0x1122334455667788
    cipher = ExtentCipher({2: KEY})
    data = bytes(range(17))  # not a whole AES block: ciphertext stealing
    assert cipher.encrypt(2, seg, off, data) == _xts_reference(KEY, seg, off, data)


def test_same_payload_at_two_addresses_encrypts_differently() -> None:
    cipher = ExtentCipher({1: KEY})
    here = cipher.encrypt(1, 5, 0, PLAIN)
    assert cipher.encrypt(1, 5, 0, PLAIN) == here  # deterministic for one address
    others = {cipher.encrypt(1, 5, 16, PLAIN), cipher.encrypt(1, 6, 0, PLAIN),
              cipher.encrypt(1, 0, 5, PLAIN)}
    assert here not in others and len(others) == 3
    # And no 16-byte AES block of the ciphertext repeats across the addresses.
    blocks = [c[i:i + 16] for c in (here, *others) for i in range(0, 48, 16)]
    assert len(set(blocks)) == len(blocks)


def test_key_versions_are_separate() -> None:
    other = bytes(range(64, 128))
    cipher = ExtentCipher({1: KEY, 2: other})
    assert cipher.versions == [1, 2]
    assert cipher.encrypt(2, 3, 4096, PLAIN) == _xts_reference(other, 3, 4096, PLAIN)
    with pytest.raises(IntegrityError, match="key version 3"):
        cipher.encrypt(3, 3, 4096, PLAIN)


def test_xts_key_with_equal_halves_is_rejected() -> None:
    with pytest.raises(IntegrityError, match="key version 4"):
        ExtentCipher({4: bytes(32) * 2})
    with pytest.raises(IntegrityError):
        ExtentCipher({1: KEY[:32] + KEY[:32]})
    with pytest.raises(IntegrityError):
        ExtentCipher({1: KEY[:48]})  # not 512 bits
    for _ in range(20):
        key = new_tek()
        assert len(key) == 64 and key[:32] != key[32:]


# -- index keys ---------------------------------------------------------------------------

INDEX_KEY = bytes(range(32))
#: IndexKeys(INDEX_KEY).name(32 zero bytes), computed once and pinned.
NAME_KAT = bytes.fromhex("db026f1669652b0d0085ac5bad5574748b100dc8a50e003464dea57d90c3fb24")


def test_index_name_known_answer() -> None:
    blob_id = bytes(32)
    keys = IndexKeys(INDEX_KEY)
    assert keys.name(blob_id) == NAME_KAT
    # Independently: HMAC-SHA256 under the first half of HKDF(index key, "dvx-dr index v1").
    derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                   info=b"dvx-dr index v1").derive(INDEX_KEY)
    assert hmac.new(derived[:32], blob_id, hashlib.sha256).digest() == NAME_KAT
    assert keys.name(blob_id) != blob_id
    assert IndexKeys(bytes(32)).name(blob_id) != NAME_KAT  # another key, another name


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
@settings(max_examples=200, deadline=None)
def test_index_names_are_hmac_sha256_under_the_name_key(index_key: bytes, blob_id: bytes
                                                         ) -> None:
    """Names come from copies of one keyed HMAC object; they are the names a new HMAC for
    each gives."""
    derived = HKDF(algorithm=hashes.SHA256(), length=64, salt=None,
                   info=b"dvx-dr index v1").derive(index_key)
    assert IndexKeys(index_key).name(blob_id) == hmac.digest(derived[:32], blob_id, "sha256")


def test_sealed_id_round_trip() -> None:
    keys = IndexKeys(INDEX_KEY)
    blob_id = hashlib.sha256(b"block").digest()
    name = keys.name(blob_id)
    sealed = keys.seal(name, blob_id)
    assert len(sealed) == 12 + 32 + 16
    assert blob_id not in sealed
    assert keys.seal(name, blob_id) != sealed  # a fresh nonce every time
    assert keys.unseal(name, sealed) == blob_id


@pytest.mark.parametrize("position", [0, 11, 12, 30, 43, 44, 59])
def test_tampered_sealed_id_is_an_integrity_error(position: int) -> None:
    keys = IndexKeys(INDEX_KEY)
    blob_id = hashlib.sha256(b"block").digest()
    name = keys.name(blob_id)
    sealed = bytearray(keys.seal(name, blob_id))
    sealed[position] ^= 0x01
    with pytest.raises(IntegrityError, match="sealed id does not verify"):
        keys.unseal(name, bytes(sealed))


def test_sealed_id_bound_to_its_name_key_and_length() -> None:
    keys = IndexKeys(INDEX_KEY)
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    sealed = keys.seal(keys.name(a), a)
    with pytest.raises(IntegrityError):
        keys.unseal(keys.name(b), sealed)  # a row whose sealed id was swapped in
    with pytest.raises(IntegrityError):
        IndexKeys(bytes(32)).unseal(keys.name(a), sealed)
    for cut in (0, 5, 11, 12, 40, 59):
        with pytest.raises(IntegrityError):
            keys.unseal(keys.name(a), sealed[:cut])
    with pytest.raises(IntegrityError):
        keys.unseal(keys.name(a), sealed + b"\0")


def test_plain_index_names_are_raw_ids_and_checked() -> None:
    plain = PlainIndex()
    blob_id = hashlib.sha256(b"x").digest()
    assert plain.name(blob_id) == plain.seal(blob_id, blob_id) == blob_id
    assert plain.unseal(blob_id, blob_id) == blob_id
    with pytest.raises(IntegrityError):
        plain.unseal(blob_id, bytes(32))


# -- keystore -----------------------------------------------------------------------------

PASSWORD = "keystore test password"
STORE_ID = "6c0f1d1e-0000-4000-8000-000000000001"


@pytest.fixture
def keys() -> KeyMaterial:
    return KeyMaterial(bytes(range(32)), {1: bytes(range(64)), 2: bytes(range(1, 65))})


@pytest.fixture
def keystore_path(tmp_path: Path, keys: KeyMaterial) -> Path:
    path = tmp_path / "keystore.json"
    Keystore.create(path, STORE_ID, "site-a", PASSWORD, keys)
    return path


def _rewrite(path: Path, change: object) -> None:
    doc = json.loads(path.read_bytes())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


def test_keystore_round_trip(keystore_path: Path, keys: KeyMaterial) -> None:
    assert keystore_path.stat().st_mode & 0o777 == 0o600
    raw = keystore_path.read_text()
    assert keys.index_key.hex() not in raw and keys.teks[1].hex() not in raw
    doc = json.loads(raw)
    assert (doc["format"], doc["version"], doc["store_id"], doc["site"]) == \
        ("dvx-dr-keystore", 1, STORE_ID, "site-a")
    assert doc["kdf"]["name"] == "scrypt"
    store = Keystore.load(keystore_path, STORE_ID)
    assert store.store_id == STORE_ID and not store.fips
    assert store.unlock(PASSWORD) == keys


def test_keystore_wrong_password(keystore_path: Path) -> None:
    with pytest.raises(WrongPasswordError, match="wrong password") as err:
        Keystore.load(keystore_path, STORE_ID).unlock("not the password")
    assert str(keystore_path) in str(err.value)


def test_kek_derived_ahead_is_used_once_for_the_same_password_and_parameters(
        keystore_path: Path, keys: KeyMaterial, monkeypatch: pytest.MonkeyPatch) -> None:
    early = KekDerivation.start(keystore_path.parent, PASSWORD)
    other = KekDerivation.start(keystore_path.parent, "another password")
    before_edit = KekDerivation.start(keystore_path.parent, PASSWORD)
    assert early is not None and other is not None and before_edit is not None

    def no_kdf(password: str, params: dict) -> bytes:
        raise AssertionError("derived again")

    monkeypatch.setattr(keystore_module, "derive_kek", no_kdf)
    assert Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD, early) == keys
    # Used once: the derivation forgets the password and the KEK.
    with pytest.raises(AssertionError, match="derived again"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD, early)
    # A derivation for another password is not used.
    with pytest.raises(AssertionError, match="derived again"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD, other)
    # Nor one for other parameters (the keystore was rewritten since).
    _rewrite(keystore_path, lambda d: d["kdf"].update(salt=base64.b64encode(bytes(16)).decode()))
    with pytest.raises(AssertionError, match="derived again"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD, before_edit)


def test_kek_derived_for_a_wrong_password_is_a_wrong_password(keystore_path: Path) -> None:
    wrong = KekDerivation.start(keystore_path.parent, "not the password")
    with pytest.raises(WrongPasswordError, match="wrong password"):
        Keystore.load(keystore_path, STORE_ID).unlock("not the password", wrong)


def test_kek_derivation_needs_a_readable_keystore(tmp_path: Path) -> None:
    assert KekDerivation.start(tmp_path, PASSWORD) is None  # a plain store has none
    (tmp_path / "keystore.json").write_text("{not json")
    assert KekDerivation.start(tmp_path, PASSWORD) is None


def test_keystore_tampered_mac(keystore_path: Path) -> None:
    _rewrite(keystore_path, lambda d: d.update(mac="0" * 64))
    with pytest.raises(FormatError, match="MAC does not verify"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD)


KEYSTORE_EDITS = {
    "site": lambda d: d.update(site="site-b"),
    "tek created": lambda d: d["teks"][0].update(created="1999-01-01T00:00:00+00:00"),
    "tek dropped": lambda d: d.update(teks=d["teks"][:1]),
    "startup slot": lambda d: d["index_key"].update(startup="AAAA"),
    "extra field": lambda d: d.update(comment="hello"),
}


@pytest.mark.parametrize("edit", sorted(KEYSTORE_EDITS))
def test_keystore_edited_field(keystore_path: Path, edit: str) -> None:
    _rewrite(keystore_path, KEYSTORE_EDITS[edit])
    with pytest.raises(FormatError, match="altered"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD)


def test_keystore_edited_wrapped_key_is_not_a_wrong_password(keystore_path: Path) -> None:
    def change(doc: dict) -> None:
        text = doc["teks"][1]["password"]
        doc["teks"][1]["password"] = ("B" if text[0] == "A" else "A") + text[1:]

    _rewrite(keystore_path, change)
    with pytest.raises(FormatError, match="altered"):
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD)


@pytest.mark.parametrize("kdf", [{"n": 3}, {"n": "many"}, {"salt": "%%"}, {"name": "md5"},
                                 {"r": None}])
def test_keystore_malformed_kdf_is_a_format_error(keystore_path: Path, kdf: dict) -> None:
    _rewrite(keystore_path, lambda d: d["kdf"].update(kdf))
    with pytest.raises(FormatError) as err:
        Keystore.load(keystore_path, STORE_ID).unlock(PASSWORD)
    assert str(keystore_path) in str(err.value)


@pytest.mark.parametrize("cut", [0, 1, 100, -1])
def test_keystore_truncated_names_the_file(keystore_path: Path, cut: int) -> None:
    raw = keystore_path.read_bytes().rstrip()
    keystore_path.write_bytes(raw[:cut])
    with pytest.raises(FormatError) as err:
        Keystore.load(keystore_path, STORE_ID)
    assert str(keystore_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_keystore_unknown_version_is_named(keystore_path: Path) -> None:
    _rewrite(keystore_path, lambda d: d.update(version=2))
    with pytest.raises(FormatError, match="format version 2"):
        Keystore.load(keystore_path, STORE_ID)


def test_keystore_of_another_store(keystore_path: Path) -> None:
    with pytest.raises(UserError, match="belongs to another store") as err:
        Keystore.load(keystore_path, "6c0f1d1e-0000-4000-8000-000000000002")
    assert not isinstance(err.value, FormatError)
    assert STORE_ID in str(err.value)


def test_keystore_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is missing"):
        Keystore.load(tmp_path / "keystore.json", STORE_ID)


# -- snapshot root ------------------------------------------------------------------------

ROOT = Root(depth=2, block_size=65536, size=10 * 1024**3 + 5, mapped_blocks=12345,
            top=bytes(range(32)))
ROOT_KAT = bytes.fromhex(
    "44585652" "01" "02" "0000" "00000100" "0500008002000000" "3930000000000000"
    "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")


def test_root_known_bytes() -> None:
    assert ROOT.pack() == ROOT_KAT
    assert len(ROOT_KAT) == 60
    assert Root.unpack(ROOT_KAT) == ROOT
    assert ROOT.nblocks == 10 * 16384 + 1


def test_root_unknown_version_is_named() -> None:
    data = ROOT_KAT[:4] + bytes([2]) + ROOT_KAT[5:]
    with pytest.raises(FormatError, match="snapshot root format version 2"):
        Root.unpack(data)


@pytest.mark.parametrize("data", [ROOT_KAT[:-1], ROOT_KAT + b"\0", b"DXVX" + ROOT_KAT[4:], b""])
def test_root_malformed(data: bytes) -> None:
    with pytest.raises(IntegrityError, match="malformed"):
        Root.unpack(data)
