"""A local stand-in for the Hugging Face Hub on 127.0.0.1, and fixtures that point huggingface_hub at it.
Shared by the hub and training tests (registered in conftest.py)."""

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest
import transformers


class FakeHub:
    """Just enough of the Hub's HTTP API for create_repo / create_branch / upload_folder / push_to_hub, on
    127.0.0.1. Records every call and every commit; `fail=(status, body)` answers every POST with an error;
    clearing `gate` holds commits until it is set again."""

    def __init__(self, fail: tuple[int, dict] | None = None):
        self.calls: list[tuple[str, str]] = []
        self.commits: list[dict] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: dict, headers: dict | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):  # every file lookup (e.g. an existing README.md) misses
                hub.calls.append((self.command, self.path))
                self.reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.calls.append(("POST", self.path))
                if hub.fail:
                    return self.reply(*hub.fail)
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    hub.created = request
                    return self.reply(200, {"url": f"{hub.url}/{request['organization']}/{request['name']}"})
                if self.path == "/api/validate-yaml" or "/branch/" in self.path:
                    return self.reply(200, {})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self.reply(200, {"files": modes})
                if "/commit/" in self.path:
                    hub.gate.wait(30)
                    lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                    repo, revision = self.path.split("/api/models/")[1].split("/commit/")
                    files = {
                        line["value"]["path"]: base64.b64decode(line["value"]["content"])
                        for line in lines
                        if line["key"] == "file"
                    }
                    hub.commits.append(
                        {"repo": repo, "revision": revision, "message": lines[0]["value"]["summary"], "files": files}
                    )
                    oid = f"{len(hub.commits):040x}"
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                self.reply(404, {"error": f"fake hub: no route for {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connection refused


@pytest.fixture
def hub_at(monkeypatch):
    """Point huggingface_hub (and transformers' shared HfApi) at a local URL, with a fake token; any attempt to
    resolve a host other than 127.0.0.1 fails the test instead of reaching the network."""
    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"test tried to reach {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)

    def point(url: str) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setattr(
            huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
        )

    return point


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def fake_hub():
    hub = FakeHub()
    yield hub
    hub.close()
