"""The mbi-widgets relay: device-style authorization for notebooks, Stripe Connect OAuth for Stripe.

Run it with `mbi-widgets relay`, or as an ASGI app (`uvicorn mbi_widgets.relay:app`) configured
by environment variables: MBI_RELAY_CLIENT_ID, MBI_RELAY_SECRET_KEY (the platform's secret key),
MBI_RELAY_PUBLIC_URL, MBI_RELAY_CONNECT_URL, MBI_RELAY_API_URL, MBI_RELAY_DB and MBI_RELAY_TOKEN_KEY
(the key that encrypts tokens at rest; default: a 0600 key file beside the database). Run uvicorn
with `--no-proxy-headers` unless a reverse proxy is named in `--forwarded-allow-ips`: the guess
throttles count client addresses, which X-Forwarded-For must not be able to choose.
"""
from __future__ import annotations

import os
from typing import Any

from mbi_widgets.errors import MbiError
from mbi_widgets.relay.app import RelayConfig, create_app
from mbi_widgets.relay.atrest import TOKEN_KEY_ENV

__all__ = ["RelayConfig", "create_app", "config_from_env"]


def config_from_env(env: dict[str, str] | None = None, **overrides: Any) -> RelayConfig:
    """A RelayConfig from MBI_RELAY_* variables; missing required ones raise with what to set."""
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {
        "client_id": env.get("MBI_RELAY_CLIENT_ID"),
        "secret_key": env.get("MBI_RELAY_SECRET_KEY"),
        "public_url": env.get("MBI_RELAY_PUBLIC_URL"),
        "connect_url": env.get("MBI_RELAY_CONNECT_URL", "https://connect.stripe.com"),
        "api_url": env.get("MBI_RELAY_API_URL", "https://api.stripe.com"),
        "db_path": env.get("MBI_RELAY_DB", RelayConfig.db_path),
        "token_key": env.get(TOKEN_KEY_ENV),
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [name for name in ("client_id", "secret_key", "public_url") if not values.get(name)]
    if missing:
        names = ", ".join(f"MBI_RELAY_{m.upper()}" for m in missing)
        raise MbiError(f"the relay needs {names}: the Connect client ID (ca_...), the platform's secret key and "
                       "the relay's public URL", code="relay_config")
    return RelayConfig(**values)


def __getattr__(name: str) -> Any:
    if name == "app":  # `uvicorn mbi_widgets.relay:app`
        return create_app(config_from_env())
    raise AttributeError(name)
