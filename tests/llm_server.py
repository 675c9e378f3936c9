"""A real OpenAI-compatible HTTP server on loopback for LLM tests and the benchmark.

Speaks `POST /v1/chat/completions` and `POST /v1/embeddings` with the OpenAI wire format,
records every request (path, query string, headers, JSON body), and injects faults on demand:

    server.faults.extend(["429", "500", "reset", "timeout", "nonjson", "empty"])  # next requests
    server.fail_when = lambda body: '"episode_id": 27' in body_text(body)         # always 500
    server.latency = 0.2                                                           # every request
    server.say = "extra words"                               # appended to every description

Chat requests may carry images (content parts, `image_urls(body)`). Chat answers are deterministic: `{"descriptions": [...]}` with as many strings as the prompt
asks for ("exactly N"), each naming the episode id found in the prompt's data block, so a test
can check that descriptions land on the right episode; for a data block `{"text": ...}` (a
paraphrase request), `{"paraphrases": ["<text> (rewrite i)", ...]}`.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "503", "401", "reset", "timeout", "nonjson", "empty")


def content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined (a message with images)."""
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return str(content if content is not None else "")


def body_text(body: dict[str, Any]) -> str:
    """All message texts of a chat request, joined."""
    return "\n".join(content_text(m.get("content")) for m in body.get("messages", []))


def image_urls(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `image_url` objects of a chat request's messages, in order."""
    return [
        p["image_url"]
        for m in body.get("messages", [])
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") == "image_url"
    ]


def data_block(body: dict[str, Any]) -> dict[str, Any]:
    """The JSON inside <data>...</data> of the (last) user message."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    text = content_text(users[-1].get("content")) if users else ""
    match = re.search(r"<data>\s*(.*?)\s*</data>", text, re.S)
    if not match:
        raise ValueError("request has no <data> block")
    return json.loads(match.group(1))


class LLMServer:
    """Start with `start()`; `url` is the base URL to give the client (ends in /v1)."""

    def __init__(
        self,
        latency: float = 0.0,
        timeout_sleep: float = 5.0,
        dimensions: int = 8,
        port: int = 0,
    ):
        self.port = port  # 0: any free port; a fixed one brings a stopped server back
        self.latency = latency
        self.timeout_sleep = timeout_sleep
        self.dimensions = dimensions
        self.faults: list[str] = []
        self.fail_when: Callable[[dict[str, Any]], bool] | None = None
        self.retry_after = "0"
        self.say = ""
        self.requests: list[dict[str, Any]] = []
        self.served: list[dict[str, Any]] = []  # requests answered with 200 and a valid body
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LLMServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between writes

            def log_message(self, *args: Any) -> None:  # quiet
                return None

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                # Request counts for a server in another process (the benchmark).
                paths = [r["path"] for r in server.requests]
                counts = {path: paths.count(path) for path in set(paths)}
                server._send(self, 200, {"requests": counts})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                server._handle(self, raw)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 256
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def count(self, path: str = "/v1/chat/completions") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r["path"] == path)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()
            self.faults.clear()
        self.fail_when = None

    # ------------------------------------------------------------------ handling
    def _handle(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        path, _, query = handler.path.partition("?")
        record = {
            "path": path,
            "query": query,
            "headers": dict(handler.headers.items()),
            "body": body,
            "time": time.monotonic(),
        }
        with self._lock:
            self.requests.append(record)
            fault = self.faults.pop(0) if self.faults else None
        if self.latency:
            time.sleep(self.latency)
        if fault is None and self.fail_when is not None and self.fail_when(body):
            fault = "500"
        if fault == "429":
            return self._send(handler, 429, {"error": {"message": "rate limited"}}, retry=True)
        if fault == "401":
            return self._send(handler, 401, {"error": {"message": "invalid api key"}})
        if fault in ("500", "503"):
            return self._send(handler, int(fault), {"error": {"message": "server error"}})
        if fault == "reset":
            # Close the socket without an answer: the client sees a connection reset.
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            handler.close_connection = True
            handler.connection.close()
            return None
        if fault == "timeout":
            time.sleep(self.timeout_sleep)
            handler.close_connection = True
            return None
        if fault == "nonjson":
            return self._send_raw(
                handler, 200, b"<html>upstream gateway hiccup</html>", "text/html"
            )
        if path.endswith("/chat/completions"):
            content = "" if fault == "empty" else self._chat_answer(body, self.say)
            answer = {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "created": 0,
                "model": body.get("model", "test"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 50, "completion_tokens": 30, "total_tokens": 80},
            }
        elif path.endswith("/embeddings"):
            inputs = body.get("input", [])
            inputs = [inputs] if isinstance(inputs, str) else inputs
            data = (
                []
                if fault == "empty"
                else [
                    {"object": "embedding", "index": i, "embedding": self.embedding(text)}
                    for i, text in enumerate(inputs)
                ]
            )
            answer = {
                "object": "list",
                "data": data,
                "model": body.get("model", "test"),
                "usage": {"prompt_tokens": 5 * len(inputs), "total_tokens": 5 * len(inputs)},
            }
        else:
            return self._send(handler, 404, {"error": {"message": f"no route {path}"}})
        if fault is None:
            with self._lock:
                self.served.append(record)
        return self._send(handler, 200, answer)

    def embedding(self, text: str) -> list[float]:
        """A deterministic vector per text (the test's independent reference)."""
        digest = hashlib.sha256(str(text).encode()).digest()
        return [(digest[i] - 128) / 128.0 for i in range(self.dimensions)]

    @staticmethod
    def _chat_answer(body: dict[str, Any], say: str = "") -> str:
        text = body_text(body)
        match = re.search(r"exactly (\d+)", text)
        n = int(match.group(1)) if match else 1
        try:
            facts = data_block(body)
        except ValueError:
            facts = {}
        if "text" in facts:  # a paraphrase request: rewrites that keep the text's words
            rewrites = [f"{facts['text']} (rewrite {i}){say}" for i in range(n)]
            return json.dumps({"paraphrases": rewrites})
        who = f"episode {facts.get('episode_id')}"
        if "segment" in facts:
            who += f" segment {facts['segment']}"
        return json.dumps({"descriptions": [f"{who}: paraphrase {i}{say}" for i in range(n)]})

    def _send(
        self, handler: BaseHTTPRequestHandler, code: int, payload: Any, retry: bool = False
    ) -> None:
        extra = {"retry-after": self.retry_after} if retry else {}
        self._send_raw(handler, code, json.dumps(payload).encode(), "application/json", extra)

    @staticmethod
    def _send_raw(
        handler: BaseHTTPRequestHandler,
        code: int,
        data: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        try:
            handler.send_response(code)
            handler.send_header("content-type", content_type)
            handler.send_header("content-length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def main() -> None:
    """Serve in this process until killed: `python -m tests.llm_server --latency 0.2`.
    Prints the base URL on the first line of stdout."""
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI-compatible test server on loopback")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    server = LLMServer(latency=args.latency).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
