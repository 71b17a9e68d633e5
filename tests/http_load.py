"""A small HTTP load client: concurrent clients posting sign-ups to the example project.

Run as ``python -m tests.http_load PORT OUT --clients 32 --duration 60 --prefix RUN``. Each
client fetches the sign-up form once (for its CSRF cookie and token), then posts sign-ups
with usernames of its own, one after another, until ``duration`` seconds after all clients
are ready. A process of its own, so the clients' threads do not compete for a GIL with
whatever the caller runs (the fault proxy in front of the broker, in test_http_load).

Prints the start time (``time.monotonic()``, system-wide on Linux) once every client is
ready, then writes ``OUT``: JSON, ``{"t0": ..., "requests": [[start, end, status, username],
...]}``, where ``status`` is the HTTP status, or the exception's name if there was none.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

PATH = "/accounts/register/"
TOKEN = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
TIMEOUT = 60.0  # past gunicorn's worker timeout (30 s): its 502/500 is what we want to see

Row = list[object]


def request(port: int, method: str, body: str = "", cookie: str = "") -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    headers = {"Connection": "close"}
    if cookie:
        headers["Cookie"] = cookie
    if body:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    connection.request(method, PATH, body=body or None, headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def csrf(port: int) -> tuple[str, str]:
    """The cookie and form token a browser would get with the sign-up page."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    connection.request("GET", PATH)
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    cookie = response.getheader("Set-Cookie", "").split(";", 1)[0]
    match = TOKEN.search(page)
    if response.status != 200 or not cookie.startswith("csrftoken=") or match is None:
        raise RuntimeError(f"GET {PATH}: {response.status}, no CSRF cookie or token")
    return cookie, match[1]


def client(
    port: int,
    name: str,
    ready: threading.Barrier,
    start: list[float],
    until: float,
    rows: list[Row],
) -> None:
    try:
        cookie, token = csrf(port)
    except Exception:
        ready.abort()
        raise
    ready.wait()
    deadline = start[0] + until
    n = 0
    while time.monotonic() < deadline:
        username = f"{name}-{n}"
        n += 1
        body = urlencode(
            {"username": username, "email": f"{username}@example.com", "csrfmiddlewaretoken": token}
        )
        began = time.monotonic()
        try:
            status: object = request(port, "POST", body, cookie).status
        except Exception as error:
            status = type(error).__name__
        rows.append([began, time.monotonic(), status, username])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("port", type=int)
    parser.add_argument("out", type=Path)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--prefix", default="load")
    args = parser.parse_args()

    start: list[float] = []
    ready = threading.Barrier(args.clients + 1, action=lambda: start.append(time.monotonic()))
    rows: list[Row] = []  # list.append is atomic: the threads share it
    threads = [
        threading.Thread(
            target=client,
            args=(args.port, f"{args.prefix}-{i}", ready, start, args.duration, rows),
            daemon=True,
        )
        for i in range(args.clients)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=TIMEOUT)
    except threading.BrokenBarrierError:
        sys.exit("http_load: a client could not fetch the sign-up form")
    print(f"started {start[0]!r}", flush=True)
    for thread in threads:
        thread.join()
    args.out.write_text(json.dumps({"t0": start[0], "requests": rows}))


if __name__ == "__main__":
    main()
