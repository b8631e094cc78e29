"""The front door: ``create_model(name, pretrained=True | 'official' | 'hf-hub:...' | URL | path)``
and the download cache, offline: a local HTTP server on 127.0.0.1, file URLs, a pre-filled cache,
and a port nothing listens on for the no-network error."""

from __future__ import annotations

import ast
import hashlib
import http.server
import os
import socket
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from utils import assert_logits_close

import cga_jax
from cga_jax import download as dl
from cga_jax.cli import main
from cga_jax.config import VARIANTS
from cga_jax.keymap import to_timm_state_dict

TINY = "efficientvit_tiny"  # registered per test: the official_tiny fixture's config
HUB = "timm/efficientvit_tiny.r80_test"


class Server:
    """A local HTTP server in a thread. ``routes``: path -> (status, headers, body, bytes to send
    before closing the connection (None: all)); every request's path is logged in ``hits``."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes, int | None]] = {}
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                server.hits.append(self.path)
                status, headers, body, cut = server.routes.get(self.path, (404, {}, b"", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    path = str(tmp_path / "cache")
    monkeypatch.setenv("CGA_JAX_CACHE", path)
    return path


@pytest.fixture
def tiny(fixtures_dir, monkeypatch):
    """Registers the official_tiny fixture's config as ``efficientvit_tiny``; returns its npz."""
    z = np.load(fixtures_dir / "official_tiny.npz", allow_pickle=False)
    monkeypatch.setitem(
        VARIANTS, TINY, cga_jax.EfficientViTConfig(**ast.literal_eval(str(z["config"])))
    )
    return z


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


def _logits(model, z) -> np.ndarray:
    model.eval()
    return np.asarray(
        nnx.jit(lambda m, v: m(v))(model, jnp.asarray(z["input"].transpose(0, 2, 3, 1)))
    )


def _same_weights(a, b) -> None:
    sa, sb = to_timm_state_dict(a), to_timm_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CGA_JAX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("CGA_JAX_CACHE")
    assert dl.cache_dir() == str(tmp_path / "xdg" / "cga_jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.cache_dir() == str(tmp_path / "home" / ".cache" / "cga_jax")
    url = dl.OFFICIAL_URLS["efficientvit_m0"]
    assert url.startswith("https://github.com/") and url.endswith("/v1.0/efficientvit_m0.pth")
    assert dl.cache_path(url, "/c") == (
        "/c/github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0/"
        "efficientvit_m0.pth"
    )
    assert dl.cache_path("http://h:8/a/b.pth?x=1", "/c") != dl.cache_path(
        "http://h:8/a/b.pth?x=2", "/c"
    )


def test_pretrained_true_downloads_once(fixtures_dir, tiny, server, cache, monkeypatch):
    """pretrained=True: the official weights of the model, fetched once from the release URL
    into the cache, then read from the cache (also when the server is gone)."""
    pytest.importorskip("torch")  # the release files are PyTorch .pth
    data = (fixtures_dir / "official_tiny.pth").read_bytes()
    server.routes["/rel/efficientvit_tiny.pth"] = (200, {}, data, None)
    url = f"{server.url}/rel/efficientvit_tiny.pth"
    monkeypatch.setitem(dl.OFFICIAL_URLS, TINY, url)
    model = cga_jax.create_model(TINY, pretrained=True)
    assert_logits_close(_logits(model, tiny), tiny["logits_eval"], "pretrained=True vs official")
    assert server.hits == ["/rel/efficientvit_tiny.pth"]
    assert _files(cache) == [os.path.relpath(dl.cache_path(url), cache)]
    with open(dl.cache_path(url), "rb") as f:
        assert f.read() == data
    again = cga_jax.create_model(f"{TINY}.r224_in1k", pretrained="official")
    assert server.hits == ["/rel/efficientvit_tiny.pth"], "downloaded twice"
    _same_weights(again, model)
    server.close()  # a pre-filled cache needs no network
    _same_weights(cga_jax.create_model(TINY, pretrained=True), model)


def test_pretrained_new_classifier(fixtures_dir, tiny, cache, monkeypatch):
    """pretrained=True with another num_classes keeps the backbone and a fresh classifier."""
    pytest.importorskip("torch")
    url = (fixtures_dir / "official_tiny.pth").as_uri()
    monkeypatch.setitem(dl.OFFICIAL_URLS, TINY, url)
    ref = cga_jax.create_model(TINY, pretrained=True)
    with pytest.warns(UserWarning, match="classifier left at its fresh initialisation"):
        ft = cga_jax.create_model(TINY, pretrained=True, num_classes=3)
    fresh = cga_jax.create_model(TINY, num_classes=3)
    assert ft.head.linear.kernel.shape == (ref.head.linear.kernel.shape[0], 3)
    np.testing.assert_array_equal(ft.head.linear.kernel[...], fresh.head.linear.kernel[...])
    a, b = to_timm_state_dict(ft), to_timm_state_dict(ref)
    for k in b:
        if not k.startswith("head.linear"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _hub_routes(server: Server, data: bytes, sha: str) -> str:
    """The hub's shape: ``resolve`` answers 302 to a CDN URL and names the file's sha256 in
    ``X-Linked-Etag`` (the CDN's own response does not)."""
    resolve = f"/{HUB}/resolve/main/model.safetensors"
    server.routes[resolve] = (
        302,
        {
            "Location": f"{server.url}/cdn/blob",
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": str(len(data)),
        },
        b"",
        None,
    )
    server.routes["/cdn/blob"] = (200, {"ETag": '"not-a-sha"'}, data, None)
    return resolve


def test_hf_hub(tmp_path, server, cache, monkeypatch):
    """hf-hub:<org>/<name>: the repository's model.safetensors (timm layout) through the hub's
    resolve URL, its published sha256 checked; a mismatch keeps nothing."""
    monkeypatch.setitem(
        VARIANTS,
        "efficientvit_small",
        VARIANTS["efficientvit_m0"].replace(img_size=64, num_classes=5),
    )
    src = cga_jax.create_model("efficientvit_small", rngs=nnx.Rngs(7))
    path = tmp_path / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in to_timm_state_dict(src).items()}, str(path))
    data = path.read_bytes()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    resolve = _hub_routes(server, data, "0" * 64)  # a wrong published checksum first
    with pytest.raises(cga_jax.CheckpointError, match="has sha256 .* expected 0{64}") as e:
        cga_jax.create_model("efficientvit_small", pretrained=f"hf-hub:{HUB}")
    assert "published by the server" in str(e.value) and _files(cache) == []
    _hub_routes(server, data, hashlib.sha256(data).hexdigest())
    server.hits.clear()
    model = cga_jax.create_model("efficientvit_small", pretrained=f"hf-hub:{HUB}")
    _same_weights(model, src)
    assert server.hits == [resolve, "/cdn/blob"]
    assert _files(cache) == [os.path.relpath(dl.cache_path(server.url + resolve), cache)]
    cga_jax.create_model("efficientvit_small", pretrained=f"hf-hub:{HUB}")
    assert len(server.hits) == 2, "downloaded twice"
    with pytest.raises(cga_jax.CheckpointError, match="expected hf-hub:<org>/<name>"):
        dl.resolve_source("hf-hub:just-a-name")


def test_urls_paths_and_pinned_checksum(tmp_path, server, cache, monkeypatch):
    monkeypatch.setitem(
        VARIANTS,
        "efficientvit_small",
        VARIANTS["efficientvit_m0"].replace(img_size=64, num_classes=5),
    )
    src = cga_jax.create_model("efficientvit_small", rngs=nnx.Rngs(8))
    path = tmp_path / "w.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in to_timm_state_dict(src).items()}, str(path))
    data = path.read_bytes()
    server.routes["/w.safetensors"] = (200, {}, data, None)
    for pretrained in (path, str(path), path.as_uri(), f"{server.url}/w.safetensors"):
        _same_weights(cga_jax.create_model("efficientvit_small", pretrained=pretrained), src)
    assert len(_files(cache)) == 2  # the file and the http URL; a local path is not copied
    assert server.hits == ["/w.safetensors"]
    sha = hashlib.sha256(data).hexdigest()
    url = f"{server.url}/w.safetensors"
    other = str(tmp_path / "c2")
    with pytest.raises(cga_jax.CheckpointError, match="expected f{64} \\(given\\)"):
        dl.download(url, sha256="f" * 64, cache=other)
    assert _files(other) == []
    assert dl.download(url, sha256=sha.upper(), cache=other) == dl.cache_path(url, other)


def test_no_network_fails_at_once_with_one_message(tiny, cache, monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/releases/download/v1.0/efficientvit_tiny.pth"
    monkeypatch.setitem(dl.OFFICIAL_URLS, TINY, url)
    t0 = time.perf_counter()
    with pytest.raises(cga_jax.CheckpointError) as e:
        cga_jax.create_model(TINY, pretrained=True)
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    for part in (
        url,
        dl.cache_path(url),
        "pretrained='/path/to/efficientvit_tiny.pth'",
        "--weights",
    ):
        assert part in msg, f"{part!r} not in: {msg}"
    assert "the official efficientvit_tiny weights" in msg and _files(cache) == []
    out = str(cache) + "-out"
    assert main(["convert", "--model", TINY, "--src", f"official:{TINY}", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download the official efficientvit_tiny weights")
    assert url in err and not os.path.exists(out)
    # not released / unknown names: one message, before any network
    monkeypatch.delitem(dl.OFFICIAL_URLS, TINY)
    with pytest.raises(cga_jax.CheckpointError, match="efficientvit_tiny: no released weights"):
        cga_jax.create_model(TINY, pretrained=True)
    with pytest.raises(cga_jax.CheckpointError, match="no official release weights for 'm9'"):
        dl.resolve_source("official:m9")


def test_failed_downloads_leave_nothing(server, cache, monkeypatch):
    """A 404, a connection that closes early and an interrupt (Ctrl-C) mid-download: one error
    each, and the cache holds no file, partial or whole."""
    body = bytes(range(256)) * 8192  # 2 MiB: several reads
    server.routes["/short.pth"] = (200, {}, body, len(body) // 3)
    server.routes["/ok.pth"] = (200, {}, body, None)
    with pytest.raises(cga_jax.CheckpointError, match="HTTP Error 404: Not Found"):
        dl.download(f"{server.url}/missing.pth")
    with pytest.raises(cga_jax.CheckpointError, match="closed after 699050 of 2097152 bytes"):
        dl.download(f"{server.url}/short.pth")
    assert _files(cache) == []
    import tqdm

    class Interrupted(tqdm.tqdm):
        def update(self, n=1):
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(tqdm, "tqdm", Interrupted)
        with pytest.raises(KeyboardInterrupt):
            dl.download(f"{server.url}/ok.pth")
    assert _files(cache) == []
    path = dl.download(f"{server.url}/ok.pth")
    assert open(path, "rb").read() == body and _files(cache) == [os.path.relpath(path, cache)]
