"""Where pretrained weights come from, fetched once into a local cache.

Sources: ``official:<model>`` (the official release on GitHub, :data:`OFFICIAL_URLS`),
``hf-hub:<org>/<name>`` (the repository's ``model.safetensors``, timm layout, over plain HTTPS),
http(s) and file URLs, local paths (returned as they are).

The cache is ``$CGA_JAX_CACHE``, else ``$XDG_CACHE_HOME/cga_jax``, else ``~/.cache/cga_jax``; a URL
is stored under its host and path. A download streams into a temporary file in the target
directory (with a tqdm progress bar on a terminal), is checked against the size the server
announced and against a sha256 where one is published, and only then renamed into place: an
interrupted or failed download leaves nothing in the cache.

Published checksums: the Hugging Face hub sends the sha256 of every LFS file in the
``X-Linked-Etag`` header of its ``resolve`` redirect, checked here. The official release publishes
none (its own loader downloads through ``torch.hub`` without a hash, and the file names carry no
hash prefix); pass ``sha256=`` to :func:`download` to pin one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from cga_jax.errors import CheckpointError

_OFFICIAL_RELEASE = (
    "https://github.com/xinyuliu-jeffrey/EfficientViT_Model_Zoo/releases/download/v1.0"
)
OFFICIAL_URLS: dict[str, str] = {
    f"efficientvit_m{i}": f"{_OFFICIAL_RELEASE}/efficientvit_m{i}.pth" for i in range(6)
}
HF_FILE = "model.safetensors"  # what timm's hub repositories hold (timm layout)
TIMEOUT_S = 30.0  # per socket operation: connect, and each read
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> str:
    """``$CGA_JAX_CACHE``, else ``$XDG_CACHE_HOME/cga_jax``, else ``~/.cache/cga_jax``."""
    if os.environ.get("CGA_JAX_CACHE"):
        return os.environ["CGA_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cga_jax")


def cache_path(url: str, cache: str | None = None) -> str:
    """Where ``url`` is cached: ``<cache>/<host>/<path>`` (a short hash of the query, if any, is
    appended to the file name), e.g. ``~/.cache/cga_jax/github.com/.../efficientvit_m0.pth``."""
    u = urllib.parse.urlsplit(url)
    parts = [urllib.parse.unquote(p) for p in u.path.split("/")]
    parts = [p.replace(os.sep, "_") for p in parts if p not in ("", ".", "..")] or ["download"]
    if u.query:
        parts[-1] += "-" + hashlib.sha256(u.query.encode()).hexdigest()[:12]
    host = (u.netloc or u.scheme).replace(":", "_")
    return os.path.join(cache or cache_dir(), host, *parts)


def hf_hub_url(repo: str) -> str:
    """The ``model.safetensors`` of a hub repository; ``$HF_ENDPOINT`` (as huggingface_hub
    reads it) replaces ``https://huggingface.co``, e.g. for a mirror."""
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return f"{endpoint.rstrip('/')}/{repo}/resolve/main/{HF_FILE}"


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib and keeps each redirect response's headers (the hub puts
    the file's sha256 on its redirect, not on the CDN's final response)."""

    def __init__(self) -> None:
        self.headers: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _published_sha256(headers) -> str | None:
    for h in headers:
        etag = (h.get("X-Linked-Etag") or "").strip().removeprefix("W/").strip('"').lower()
        if _SHA256.fullmatch(etag):
            return etag
    return None


def _fetch(url: str, f) -> tuple[str, str | None]:
    """Stream ``url`` into the open file ``f``; returns (sha256 of the bytes, published sha256).
    Raises OSError on a transfer shorter than the announced ``Content-Length``."""
    from tqdm import tqdm

    redirects = _RecordRedirects()
    opener = urllib.request.build_opener(redirects)
    req = urllib.request.Request(url, headers={"User-Agent": "cga_jax"})
    with opener.open(req, timeout=TIMEOUT_S) as r:
        published = _published_sha256([*redirects.headers, r.headers])
        length = r.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        digest, got = hashlib.sha256(), 0
        name = os.path.basename(urllib.parse.urlsplit(url).path)
        # shown on a terminal only (disable=None)
        bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None
        )
        with bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if total is not None and got != total:
        raise OSError(f"the connection closed after {got} of {total} bytes")
    return digest.hexdigest(), published


def download(
    url: str,
    *,
    sha256: str | None = None,
    cache: str | None = None,
    what: str | None = None,
) -> str:
    """Fetch ``url`` into the cache once (see the module docstring) and return the cached path.

    ``sha256``: the expected checksum (default: the one the server publishes, if any). ``what``
    names the file in error messages. Any failure raises one :class:`CheckpointError` naming the
    URL, the cache path and how to pass a local file instead, and leaves the cache as it was.
    """
    dst = cache_path(url, cache)
    if os.path.isfile(dst):
        return dst
    what = what or url
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=".part-")
    except OSError as e:
        raise CheckpointError(
            f"cannot download {what}: the cache directory {os.path.dirname(dst)} is not writable "
            f"({e.strerror or e}); set CGA_JAX_CACHE to a writable directory"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            got, published = _fetch(url, f)
        want = (sha256 or published or "").lower()
        if want and got != want:
            raise CheckpointError(
                f"{what}: the downloaded file from {url} has sha256 {got}, expected {want} "
                f"({'given' if sha256 else 'published by the server'}); it was discarded and "
                f"nothing was written to the cache ({dst})"
            )
        os.replace(tmp, dst)
    except (OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(_failed(what, url, dst, e)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dst


def _failed(what: str, url: str, dst: str, e: BaseException) -> str:
    reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
    name = os.path.basename(dst)
    return (
        f"cannot download {what} from {url} ({type(e).__name__}: {reason}). Nothing was written "
        f"to the cache. Without network, get the file elsewhere and pass the local file "
        f"instead (pretrained='/path/to/{name}' in Python, --weights or --src /path/to/{name} "
        f"on the command line), or put it at {dst}"
    )


def resolve_source(src: str | os.PathLike, cache: str | None = None) -> str:
    """A local path for ``src``: ``official:<model>``, ``hf-hub:<org>/<name>`` and URLs are
    downloaded (once, into the cache); anything else is a local path, returned as it is."""
    src = os.fspath(src)
    if src.startswith("official:"):
        name = src[len("official:") :]
        if name not in OFFICIAL_URLS:
            raise CheckpointError(
                f"{src}: no official release weights for {name!r}; released: "
                f"{', '.join(OFFICIAL_URLS)}"
            )
        return download(OFFICIAL_URLS[name], cache=cache, what=f"the official {name} weights")
    if src.startswith("hf-hub:"):
        repo = src[len("hf-hub:") :]
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise CheckpointError(
                f"{src}: expected hf-hub:<org>/<name>, e.g. hf-hub:timm/efficientvit_m0.r224_in1k"
            )
        what = f"{HF_FILE} of the Hugging Face hub repository {repo!r}"
        return download(hf_hub_url(repo), cache=cache, what=what)
    if src.startswith(("http://", "https://", "file://")):
        return download(src, cache=cache)
    return src
