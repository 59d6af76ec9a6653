"""``sam2-fast download`` against a local HTTP server on 127.0.0.1 serving a generated
checkpoint (no outside network): fresh download, resume, size / key / checksum checks,
offline failure, file:// mirrors, and the cache used by the other commands."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from cli_harness import SIZE, assert_clean_error, clip, http_server, run_cli, shared_checkpoint, write_mp4

PATH = "/092824/sam2.1_hiera_tiny.pt"  # the official layout: BASE/092824/sam2.1_hiera_tiny.pt


@pytest.fixture(scope="module")
def blob(tmp_path_factory):
    with open(shared_checkpoint(tmp_path_factory), "rb") as f:
        return f.read()


def _download(capsys, base, folder, *extra):
    return run_cli(capsys, "download", "tiny", "--base-url", base, "--dir", folder, "--no-progress", *extra)


def test_download_then_track_without_checkpoint(blob, tmp_path, capsys, monkeypatch):
    with http_server({PATH: blob}) as (base, log):
        res = _download(capsys, base, tmp_path / "cache", "--sha256", hashlib.sha256(blob).hexdigest())
    assert res.code == 0, res.err
    dest = tmp_path / "cache" / "sam2.1_hiera_tiny.pt"
    assert str(dest) in res.out and dest.read_bytes() == blob
    assert [r["path"] for r in log] == [PATH] and os.listdir(tmp_path / "cache") == ["sam2.1_hiera_tiny.pt"]
    # the cache is where every command finds the checkpoint when --checkpoint is omitted
    monkeypatch.setenv("SAM2_FAST_HOME", str(tmp_path / "cache"))
    video = write_mp4(str(tmp_path / "v.mp4"), clip(2, 64, 64))
    res = run_cli(capsys, "track", video, "--model", "tiny", "--image-size", SIZE, "--device", "cpu",
                  "--point", "0:1:30,30", "--out", tmp_path / "o", "--no-progress")
    assert res.code == 0, res.err
    # a second download finds the file and does not fetch it again
    with http_server({PATH: blob}) as (base, log):
        res = run_cli(capsys, "download", "sam2.1_hiera_tiny", "--base-url", base, "--no-progress")
    assert res.code == 0 and "already at" in res.out and log == []


def test_resume_after_a_dropped_connection(blob, tmp_path, capsys):
    with http_server({PATH: blob}, cut_after={PATH: len(blob) // 3}) as (base, log):
        res = _download(capsys, base, tmp_path)
    assert_clean_error(res, "run the same command again to resume")
    part = tmp_path / "sam2.1_hiera_tiny.pt.part"
    assert part.stat().st_size == len(blob) // 3 and not (tmp_path / "sam2.1_hiera_tiny.pt").exists()
    with http_server({PATH: blob}) as (base, log):
        res = _download(capsys, base, tmp_path)
    assert res.code == 0, res.err
    assert log == [{"path": PATH, "range": f"bytes={len(blob) // 3}-"}]  # only the rest was fetched
    assert (tmp_path / "sam2.1_hiera_tiny.pt").read_bytes() == blob and not part.exists()


def test_wrong_file_on_the_server_is_rejected(blob, tmp_path, capsys):
    with http_server({"/092824/sam2.1_hiera_small.pt": blob}) as (base, _):
        res = run_cli(capsys, "download", "small", "--base-url", base, "--dir", tmp_path, "--no-progress")
    assert_clean_error(res, "not a sam2.1_hiera_small checkpoint (it fits sam2.1_hiera_tiny)")
    assert os.listdir(tmp_path) == []  # nothing kept: neither the file nor a part to resume
    with http_server({PATH: b"not a checkpoint" * 100}) as (base, _):
        res = _download(capsys, base, tmp_path)
    assert_clean_error(res, "is not a usable checkpoint")
    assert os.listdir(tmp_path) == []


def test_checksum_mismatch_and_http_errors(blob, tmp_path, capsys):
    with http_server({PATH: blob}) as (base, _):
        res = _download(capsys, base, tmp_path, "--sha256", "0" * 64)
        assert_clean_error(res, "SHA-256 of the download is")
        assert os.listdir(tmp_path) == []
        res = run_cli(capsys, "download", "large", "--base-url", base, "--dir", tmp_path, "--no-progress")
        assert_clean_error(res, "HTTP 404", "curl -L -o")


def test_offline_fails_fast_with_the_address(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _download(capsys, f"http://127.0.0.1:{port}/mirror", tmp_path, "--timeout", "5")
    assert_clean_error(res, "cannot reach", f"http://127.0.0.1:{port}/mirror{PATH}", str(tmp_path / "sam2.1_hiera_tiny.pt"))
    res = run_cli(capsys, "download", "gigantic", "--dir", tmp_path)
    assert_clean_error(res, "unknown model 'gigantic'")


def test_file_mirror(blob, tmp_path, capsys):
    mirror = tmp_path / "mirror" / "092824"
    mirror.mkdir(parents=True)
    (mirror / "sam2.1_hiera_tiny.pt").write_bytes(blob)
    res = _download(capsys, (tmp_path / "mirror").as_uri(), tmp_path / "cache")
    assert res.code == 0, res.err
    assert (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").stat().st_size == len(blob)


def test_official_addresses():
    from sam2_fast.commands.models import resolve_model

    assert resolve_model("large").url() == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    assert resolve_model("facebook/sam2-hiera-base-plus").url() == \
        "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt"
    assert resolve_model("configs/sam2.1/sam2.1_hiera_s.yaml").name == "sam2.1_hiera_small"


def test_from_pretrained_finds_the_download_cache(tmp_path, monkeypatch):
    """What ``sam2-fast download`` fetched (into $SAM2_FAST_HOME) is where the builders look."""
    from sam2_fast import build_sam
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("SAM2_FAST_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(work))
    monkeypatch.delenv("SAM2_FAST_CHECKPOINT_DIR", raising=False)
    monkeypatch.delenv("SAM2_CHECKPOINT_DIR", raising=False)
    monkeypatch.chdir(work)  # no ./checkpoints, no file in the working directory
    ckpt = home / "sam2.1_hiera_tiny.pt"
    ckpt.write_bytes(b"placeholder")  # only the lookup is under test
    config, path = build_sam.find_checkpoint("facebook/sam2.1-hiera-tiny")
    assert path == str(ckpt) and config.endswith("sam2.1_hiera_t.yaml")
