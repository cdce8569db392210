"""HTTP basic auth: an Authorization header and the configured credentials in, whether they match out;
and the header Label Studio's webhook must carry.

Kept apart from the web layer because the worker writes that header into Label Studio's webhook.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def credentials_match(header: str | None, expected: tuple[str, str]) -> bool:
    """The Authorization header names the configured user and password, both compared in constant time.

    Compared as bytes: Label Studio (requests) encodes a non-ASCII password as Latin-1, browsers and
    curl as UTF-8; either matches, and no header however odd gives anything but False."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, colon, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except ValueError:  # binascii.Error is a ValueError
        return False
    matched = False
    for encoding in ("utf-8", "latin-1"):
        try:
            want_user, want_password = (part.encode(encoding) for part in expected)
        except UnicodeEncodeError:
            continue
        # both compared, whatever the first gives: the time taken says nothing about which was wrong
        matched |= hmac.compare_digest(user, want_user) & hmac.compare_digest(password, want_password)
    return bool(colon) and matched


def basic_auth_header(credentials: tuple[str, str]) -> str:
    """The Authorization header value for `credentials` (what Label Studio's webhook must send)."""
    return "Basic " + base64.b64encode(":".join(credentials).encode("utf-8")).decode("ascii")


def webhook_auth_digest(credentials: tuple[str, str]) -> str:
    """What the store keeps to know a webhook already carries these credentials: a hash, not the secret."""
    return hashlib.sha256(basic_auth_header(credentials).encode("utf-8")).hexdigest()
