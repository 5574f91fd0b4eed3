"""The error family: each error carries its status and whether its message is for the user."""
from __future__ import annotations

from lookalike.core.artifacts import VersionNotFound
from lookalike.core.errors import (InputError, LookalikeError, NotFoundError, TooLargeError, UnavailableError,
                                   is_user_error, status_of)


def test_error_family_carries_status_and_who_is_to_blame():
    assert status_of(InputError("bad")) == 400 and isinstance(InputError("bad"), ValueError)
    assert status_of(VersionNotFound("no such version")) == 404 and isinstance(VersionNotFound("x"), NotFoundError)
    assert is_user_error(LookalikeError("x"))
    assert not is_user_error(ValueError("a bug")) and status_of(ValueError("a bug")) == 500


def test_each_family_class_has_its_status():
    assert [status_of(c("x")) for c in (LookalikeError, InputError, TooLargeError, NotFoundError,
                                         UnavailableError)] == [500, 400, 413, 404, 503]
    assert isinstance(TooLargeError("x"), InputError)
