"""An S3 endpoint that starts failing: an HTTP proxy on 127.0.0.1 in front of the moto server.

Ray actors reach it like any S3 endpoint (endpoint_url), so a failure happens inside the writer
actor's process, as it would against a real outage. Until `fail_from` is reached it relays every
request; from then on, every request of the failing operation gets 500 InternalError, while the
others (AbortMultipartUpload in particular) still pass.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
         b"<Message>We encountered an internal error. Please try again.</Message></Error>")


def operation(method: str, query: dict) -> str:
    if method == "PUT":
        return "UploadPart" if "partNumber" in query else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return {"GET": "GetObject", "HEAD": "HeadObject"}.get(method, method)


class FailingS3Proxy:
    def __init__(self, upstream: str, failing: str = "UploadPart", fail_from: int = 1):
        """Fail `failing` requests from the `fail_from`-th one on (1: all of them)."""
        self.upstream = urlsplit(upstream)
        self.failing, self.fail_from = failing, fail_from
        self.seen: list[str] = []  # operations in arrival order, failed ones included
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's `Expect: 100-continue` at once

            def _relay(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                op = operation(self.command, parse_qs(urlsplit(self.path).query, keep_blank_values=True))
                with proxy._lock:
                    proxy.seen.append(op)
                    fail = op == proxy.failing and proxy.seen.count(op) >= proxy.fail_from
                    proxy.failed += fail
                if fail:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(ERROR)))
                    self.end_headers()
                    self.wfile.write(ERROR)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FailingS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
