"""A real S3-protocol server on loopback for tests, and a proxy that breaks it.

``S3Server`` runs moto's ``ThreadedMotoServer`` on 127.0.0.1 at a free port:
real HTTP, real SigV4 requests from boto3/s3fs/MosaicML, no client mocks.
``FaultProxy`` sits between a client and that server and can cut the TCP
connection in the middle of chosen uploads, which is how a flaky network or an
overloaded object store looks to the client.

Pytest fixtures wrapping these live in ``tests/conftest.py`` (``s3_server``,
``s3``, ``s3_bucket``, ``s3_fault_proxy``).  Used standalone::

    server = S3Server().start()
    os.environ.update(server.env())
    bucket = server.make_bucket()
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import uuid
from dataclasses import dataclass

import boto3
from moto.server import ThreadedMotoServer

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def s3_env(endpoint_url: str) -> dict[str, str]:
    """Environment for boto3, s3fs and MosaicML Streaming to talk to ``endpoint_url``."""
    return {
        "S3_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        # No instance-metadata lookups, no user config: tests stay on loopback.
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }


class S3Server:
    """moto's S3 server on 127.0.0.1 (port chosen by the OS)."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address=HOST, port=0, verbose=False)
        self.port = 0

    def start(self) -> "S3Server":
        # werkzeug logs every request line to stderr; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        return s3_env(self.endpoint_url)

    def client(self):
        """A boto3 S3 client talking straight to the server."""
        env = self.env()
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=env["AWS_DEFAULT_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default) and return its name."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in ``bucket``, sorted."""
        paginator = self.client().get_paginator("list_objects_v2")
        out = []
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return sorted(out)

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@dataclass
class _Rule:
    pattern: re.Pattern
    methods: tuple[str, ...]
    remaining: int | None  # cuts left; None: every matching request
    after_bytes: int


class FaultProxy:
    """A TCP proxy to an HTTP server that can drop connections mid-upload.

    ``cut(pattern, times=N)`` makes the next N requests whose method is PUT or
    POST and whose path matches the regex ``pattern`` lose their connection
    after ``after_bytes`` bytes of the body have been forwarded (never the
    whole body, so the server never sees a complete request).  ``times=None``
    cuts every matching request.  ``cut_paths`` lists what was cut, in order.
    Everything else is forwarded untouched, byte for byte.
    """

    def __init__(self, upstream_port: int, upstream_host: str = HOST):
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.cut_paths: list[str] = []
        self._denied: list[re.Pattern] = []
        self.denied_paths: list[str] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closed = True
        self._listener.close()

    def cut(self, pattern: str, *, times: int | None = 1, after_bytes: int = 256,
            methods: tuple[str, ...] = ("PUT", "POST")) -> None:
        with self._lock:
            self._rules.append(_Rule(re.compile(pattern), methods, times, after_bytes))

    def deny(self, pattern: str) -> None:
        with self._lock:
            self._denied.append(re.compile(pattern))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._denied.clear()

    def _is_denied(self, path: str) -> bool:
        with self._lock:
            if any(p.search(path) for p in self._denied):
                self.denied_paths.append(path)
                return True
        return False

    # -- plumbing -----------------------------------------------------------------
    def _take_rule(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if method in rule.methods and rule.pattern.search(path) and rule.remaining != 0:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    self.cut_paths.append(path)
                    return rule
        return None

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _close(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Server -> client: bytes as they come."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Client -> server, one HTTP/1.1 request at a time (keep-alive aware)."""
        reader = _Reader(client)
        try:
            while True:
                head = reader.read_until(b"\r\n\r\n")
                if head is None:
                    break
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path = request_line.split(" ")[:2]
                headers = {}
                for line in header_lines:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                if self._is_denied(path):
                    if "content-length" in headers:
                        reader.read_exact(int(headers["content-length"]))
                    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                            b'<Message>Access Denied</Message><RequestId>fault-proxy</RequestId></Error>')
                    client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\n"
                                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                    continue
                rule = self._take_rule(method, path)
                upstream.sendall(head)
                if "content-length" in headers:
                    body_len = int(headers["content-length"])
                    if rule is not None:
                        upstream.sendall(reader.read_exact(min(rule.after_bytes, max(body_len - 1, 0))) or b"")
                        break
                    reader.forward_exact(body_len, upstream)
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    if rule is not None:
                        upstream.sendall(reader.read_exact(rule.after_bytes) or b"")
                        break
                    reader.forward_chunked(upstream)
                elif rule is not None:
                    break
        except OSError:
            pass
        self._close(client, upstream)


class _Reader:
    """Buffered reads from a socket with the few framing helpers HTTP needs."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, marker: bytes) -> bytes | None:
        while marker not in self.buf:
            if not self._fill():
                return None
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def forward_exact(self, n: int, dst: socket.socket) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise OSError("client closed mid-body")
            piece, self.buf = self.buf[:n], self.buf[n:]
            dst.sendall(piece)
            n -= len(piece)

    def forward_chunked(self, dst: socket.socket) -> None:
        while True:
            size_line = self.read_until(b"\r\n")
            if size_line is None:
                raise OSError("client closed mid-chunk")
            dst.sendall(size_line)
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                # trailers, then an empty line
                while True:
                    line = self.read_until(b"\r\n")
                    if line is None:
                        raise OSError("client closed in trailers")
                    dst.sendall(line)
                    if line == b"\r\n":
                        return
            self.forward_exact(size + 2, dst)  # data + CRLF
