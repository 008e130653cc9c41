"""`sd-onnx serve`: an A1111-compatible HTTP API (/sdapi/v1) and a small web page, over the runtime only."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Callable

from sd_onnx.errors import UsageError


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name, or 0.0.0.0 / :: (every interface)


def parse_auth(text: str | None) -> dict[str, str] | None:
    """A1111's --api-auth: USER:PASS[,USER2:PASS2] (a password may contain ':')."""
    if not text:
        return None
    out = {}
    for pair in text.split(","):
        user, sep, password = pair.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth expects USER:PASS[,USER2:PASS2] with a user name and a password each")
        out[user] = password
    return out


def check_exposure(host: str, api_auth: str | None, insecure: bool) -> None:
    """A server reachable from other machines needs credentials, or the user's explicit --insecure."""
    if not is_loopback(host) and not api_auth and not insecure:
        raise UsageError(f"--host {host} makes the server reachable from other machines: give --api-auth USER:PASS "
                         "(HTTP Basic, as A1111's) or --insecure to serve without credentials")


def serve(model: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860, api_auth: str | None = None,
          insecure: bool = False, device: str = "auto", precision: str = "auto", threads: int | None = None,
          low_memory: bool = False, max_steps: int | None = None, max_body_mb: int | None = None,
          say: Callable[[str], None] = print) -> None:
    """Load the model, then serve until interrupted."""
    check_exposure(host, api_auth, insecure)
    credentials = parse_auth(api_auth)
    try:
        import uvicorn

        from sd_onnx.server.app import MAX_BODY_BYTES, MAX_STEPS, Limits, create_app
        from sd_onnx.server.catalog import Catalog
    except ImportError as e:
        raise UsageError(f"serve needs the server extra ({e.name} is missing): pip install 'sd-onnx[server]'") from None
    catalog = Catalog(model, device, precision, threads, low_memory)
    limits = Limits(max_body_mb * 2**20 if max_body_mb else MAX_BODY_BYTES, max_steps or MAX_STEPS)
    flags = {"listen": not is_loopback(host), "port": port, "api_auth": "(set)" if credentials else None,
             "device": device, "precision": precision, "low_memory": low_memory, "max_steps": limits.max_steps}
    app = create_app(catalog, credentials, limits, flags)
    say(f"model: {catalog.title} ({catalog.why}); serving http://{host}:{port}/ (A1111 API under /sdapi/v1)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
