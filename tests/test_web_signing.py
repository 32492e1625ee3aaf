"""colmap_pipeline.web.signing: link tokens bound to a path and an expiry."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from colmap_pipeline.web.signing import LinkSigner

PATH = "/jobs/j-1/artifacts/sparse.ply"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_token_is_valid_for_its_path_until_it_expires():
    clock = Clock(1_800_000_000.0)
    signer = LinkSigner("secret", 900, clock)
    url = signer.sign(PATH)
    parts = urlsplit(url)
    assert parts.path == PATH
    token = parse_qs(parts.query)["token"][0]
    assert token.startswith("1800000900.") and len(token) == len("1800000900.") + 43
    assert signer.valid(PATH, token)
    clock.now += 899.5
    assert signer.valid(PATH, token)
    clock.now += 0.5  # at the expiry second: expired
    assert not signer.valid(PATH, token)


def test_any_changed_byte_path_or_secret_breaks_the_token():
    clock = Clock(1_800_000_000.0)
    signer = LinkSigner("secret", 60, clock)
    token = signer.token(PATH)
    for i in range(len(token)):
        if token[i] == ".":
            continue
        changed = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        assert not signer.valid(PATH, changed), i
    assert not signer.valid("/jobs/j-2/artifacts/sparse.ply", token)
    assert not signer.valid(PATH + "x", token)
    assert not LinkSigner("other", 60, clock).valid(PATH, token)
    later = f"{int(token.split('.')[0]) + 3600}.{token.split('.')[1]}"  # a longer life
    assert not signer.valid(PATH, later)
    for junk in ("", ".", "abc.def", "-1.x", "1" * 100, "١٢٣.abc"):
        assert not signer.valid(PATH, junk)


def test_without_a_secret_each_signer_has_its_own():
    a, b = LinkSigner("", 60), LinkSigner("", 60)
    assert a.ephemeral and not LinkSigner("s", 60).ephemeral
    token = a.token(PATH)
    assert a.valid(PATH, token) and not b.valid(PATH, token)
