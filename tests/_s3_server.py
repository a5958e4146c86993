"""An S3-compatible server for the object-storage tests: moto in server mode on 127.0.0.1,
behind a small fault-injecting HTTP proxy (the tests' endpoint), both on free ports.

The proxy forwards every request unchanged (the Host header included, so SigV4 signatures
stay valid) and answers a request itself when a fault rule matches it: `proxy.fail("GET",
"/kdcl/shards/shard-", 500, times=2)` makes the next two matching GETs return HTTP 500 with
an S3 error body; `times=None` fails every match (a permanent 403). `proxy.hits` counts the
faults served.
"""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time

_CODES = {500: "InternalError", 503: "SlowDown", 403: "AccessDenied", 404: "NoSuchKey"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.rules: list[list] = []  # [method, path substring, status, remaining or None]
        self.hits: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        n = int(self.rfile.readline().split(b";")[0], 16)
                        if n == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(n)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                status = proxy._match(self.command, self.path)
                if status is not None:
                    code = _CODES.get(status, "Error")
                    err = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header(
                        "Content-Length", str(0 if self.command == "HEAD" else len(err))
                    )
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(err)
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "expect", "transfer-encoding", "keep-alive")
                }
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() in ("transfer-encoding", "connection", "content-length"):
                            continue
                        self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _match(self, method: str, path: str) -> int | None:
        with self.lock:
            for rule in self.rules:
                m, sub, status, left = rule
                if m in (method, "*") and sub in path and (left is None or left > 0):
                    if left is not None:
                        rule[3] -= 1
                    self.hits.append((method, path, status))
                    return status
        return None

    def fail(self, method: str, path_part: str, status: int, times: int | None = 1) -> None:
        with self.lock:
            self.rules.append([method, path_part, status, times])

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.hits.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class S3Server:
    """moto's S3 server (a real process) and the proxy in front of it; `env` holds what a
    client needs: dummy credentials and AWS_ENDPOINT_URL (the proxy), as s3fs/botocore read them."""

    def __init__(self):
        port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        self.proxy = FaultProxy(port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "KDCL_IO_BACKOFF": "0.05",  # fast retries in tests
        }
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True)

    def close(self) -> None:
        self.proxy.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
