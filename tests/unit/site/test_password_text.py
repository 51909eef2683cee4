"""A password that is not valid text is refused in one line that does not carry it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dvx_dr.errors import UserError
from dvx_dr.site import keys, ops
from dvx_dr.site.kdf import derive_kek, kdf_params
from dvx_dr.site.keystore import check_password_strength
from dvx_dr.site.store import Store
from tests.conftest import PASSWORD

#: What Python makes of a password typed with a byte the terminal's character set (LC_ALL=C)
#: does not decode: a lone surrogate. Encoding it failed with an error whose text (repr)
#: held the whole password, and a running site sent that back as an "internal error".
UNDECODED = "Passw0rd\udce9-SECRETTAIL"


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "SECRETTAIL" not in message and "not valid text" in message
    return message


def test_a_password_the_terminal_did_not_decode_is_refused_without_echoing_it(
        new_store: Callable[..., Store]) -> None:
    refused(lambda: check_password_strength(UNDECODED))
    refused(lambda: derive_kek(UNDECODED, kdf_params()))
    store = new_store()
    assert store.keystore is not None
    refused(lambda: store.keystore.unlock(UNDECODED))  # not "the keystore is corrupt"
    refused(lambda: ops.run(store, "encryption.change_password",
                            {"password": PASSWORD, "new_password": UNDECODED}))
    keys.change_password(store, PASSWORD, "a brand new password")  # the store is unharmed


def test_enabling_with_such_a_password_changes_nothing(new_store: Callable[..., Store]) -> None:
    store = new_store(encrypted=False)
    refused(lambda: ops.run(store, "encryption.enable", {"new_password": UNDECODED}))
    assert not store.keyed
    assert not (store.path / "keystore.json").exists()
