"""What a job checks before it joins a Ray cluster (`python -m preprocess --executor ray`, `python -m train.sweep
--executor ray`), so that a wrong address is a one-line error in seconds, not minutes of retries."""
from __future__ import annotations

import socket


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a wrong HOST:PORT: ray.init waits minutes for a cluster that is not there."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # ray:// (Ray Client) and "auto": Ray resolves them
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(f"--address {address}: no Ray cluster answers there ({e})") from None
