"""Showing secrets safely: the one place that decides how much of a key may be seen."""
from __future__ import annotations

import re


def redact(key: str) -> str:
    """`rk_live_1234****abcd`: enough to recognise a key, never enough to use it."""
    prefix, _, rest = key.rpartition("_")
    if len(rest) < 12:
        return f"{prefix}_****" if prefix else "****"
    return f"{prefix}_{rest[:4]}****{rest[-4:]}"


#: Names whose values are secrets wherever they appear: query strings, form bodies, dicts and JSON.
SECRET_NAMES = ("access_token", "refresh_token", "id_token", "token", "device_code", "user_code", "code", "state",
                "client_secret", "password", "csrf_token")
REDACTED = "[redacted]"

_NAMES = "|".join(SECRET_NAMES)
# Stripe-style secrets: secret and restricted keys, OAuth access tokens (sk_), refresh tokens, Connect codes.
_STRIPE_SECRET = re.compile(r"\b(?:sk|rk|rt|ac|whsec)_(?:(?:test|live)_)?[A-Za-z0-9]{8,}")
_PAIR = re.compile(rf"(?<![\w-])({_NAMES})=[^&\s'\",;]+")  # code=ac_...&state=... ; device_code=...
_QUOTED = re.compile(rf"""(['"])({_NAMES})\1(\s*:\s*)(['"])(?:(?!\4).)*\4""")  # {'access_token': '...'}
_AUTHORIZATION = re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*['"]?)(?:basic|bearer)\s+[^\s'",}]+""")
_COOKIE = re.compile(r"""(?i)((?:set-)?cookie['"]?\s*[:=]\s*['"]?)[^'"\r\n]+""")
_BARE_STATE = re.compile(r"(?i)\b(state )[A-Za-z0-9_\-]{16,}")  # requests-oauthlib: "Generated new state X."


def redact_text(text: str) -> str:
    """`text` with every secret we know the shape of replaced (for logs and error messages)."""
    text = _STRIPE_SECRET.sub(lambda match: redact(match.group(0)), text)
    text = _PAIR.sub(rf"\1={REDACTED}", text)
    text = _QUOTED.sub(rf"\1\2\1\3\4{REDACTED}\4", text)
    text = _AUTHORIZATION.sub(rf"\1{REDACTED}", text)
    text = _COOKIE.sub(rf"\1{REDACTED}", text)
    return _BARE_STATE.sub(rf"\1{REDACTED}", text)
