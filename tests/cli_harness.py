"""Shared pieces of the command-line tests: a generated checkpoint in the official format,
a small synthetic video, a localhost HTTP server with range requests, and a runner that
captures the exit status and the error line of ``sam2-fast``."""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List

import numpy as np
import torch

from video_utils import make_clip

SIZE = 128  # model input size of the command tests (--image-size)


def write_checkpoint(path: str, name: str = "sam2.1_hiera_tiny", seed: int = 0) -> str:
    """``{"model": state_dict}`` as the official files, sensitive random weights."""
    from sam2_fast.build_sam import build_sam2
    from sam2_fast.checkpoint import save_checkpoint
    from sam2_fast.utils.random_weights import sensitize_

    torch.manual_seed(seed)
    model = build_sam2(name, None, device="cpu")
    sensitize_(model, seed=seed, obj_score_bias=2.0)
    save_checkpoint(model, path)
    return path


def write_mp4(path: str, frames: np.ndarray, fps: int = 10) -> str:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def clip(n: int = 5, h: int = 96, w: int = 128) -> np.ndarray:
    return make_clip(n, h, w, seed=1)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_line(self) -> str:
        lines = [l for l in self.err.splitlines() if l.strip() and not l.startswith(("track:", "\r"))]
        return lines[-1] if lines else ""


def run_cli(capsys, *argv: str) -> Result:
    from sam2_fast.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    cap = capsys.readouterr()
    return Result(code, cap.out, cap.err)


def assert_clean_error(res: Result, *needles: str) -> None:
    """Non-zero exit, no traceback, and one error line naming the problem."""
    assert res.code != 0, res
    assert "Traceback" not in res.err, res.err
    line = res.error_line
    assert line.startswith("sam2-fast ") and ": error: " in line, res.err
    for n in needles:
        assert n in line, (n, line)


def tmp_leftovers(folder: str) -> List[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".tmp")]


# ---------------------------------------------------------------------------- HTTP
class _Handler(http.server.BaseHTTPRequestHandler):
    files: Dict[str, bytes] = {}
    log: List[dict] = []
    cut_after: Dict[str, int] = {}  # path -> bytes sent before the connection drops

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        self.log.append({"path": self.path, "range": rng})
        if data is None:
            self.send_error(404, "not found")
            return
        start = 0
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_error(416, "range not satisfiable")
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = self.cut_after.get(self.path)
        if cut is not None:
            body = body[:cut]
        self.wfile.write(body)
        if cut is not None:
            self.close_connection = True


@contextlib.contextmanager
def http_server(files: Dict[str, bytes], cut_after: Dict[str, int] = None) -> Iterator[tuple]:
    """A server on 127.0.0.1 serving ``files`` (path -> bytes); yields (base_url, request log)."""
    handler = type("H", (_Handler,), {"files": files, "log": [], "cut_after": dict(cut_after or {})})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.log
    finally:
        server.shutdown()
        server.server_close()


_SHARED: Dict[str, str] = {}


def shared_checkpoint(tmp_path_factory, name: str = "sam2.1_hiera_tiny") -> str:
    """One generated checkpoint per test session (a tiny one is ~150 MB), whichever module asks first."""
    if name not in _SHARED:
        folder = tmp_path_factory.mktemp("checkpoints")
        _SHARED[name] = write_checkpoint(str(folder / f"{name}.pt"), name)
    return _SHARED[name]
