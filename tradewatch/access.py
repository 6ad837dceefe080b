"""Who may change things: the one place for the API key check and the loopback rule, shared by the
API (api.py) and the dashboard's Acknowledge button."""
from __future__ import annotations

import hmac

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def key_matches(given: str | None, key: str) -> bool:
    """`given` is the API key (compared in constant time: a wrong key's timing says nothing)."""
    return bool(key) and hmac.compare_digest((given or "").encode(), key.encode())


def may_acknowledge(address: str, api_key: str, entered: str | None) -> tuple[bool, str]:
    """The dashboard's Acknowledge button on a page served at `address`: on this machine only,
    anyone who can open the page; beyond it, only with API_KEY set and entered (else a note why)."""
    if address in LOOPBACK:
        return True, ""
    if not api_key:
        return False, (f"Acknowledging is off: this page is served beyond this machine ({address or 'every address'})"
                       " and API_KEY is not set.")
    if key_matches(entered, api_key):
        return True, ""
    return False, "Enter the API key in the sidebar to acknowledge alerts."
