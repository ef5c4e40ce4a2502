"""Tests for minimoe.data (corpora, download cache, token files, batching).

Network tests only talk to a throwaway http.server on 127.0.0.1.
"""

import functools
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

from minimoe import data, synthetic
from minimoe.data import DataError


def one_sentence(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg


# ---------------------------------------------------------------- corpora


def test_builtin_corpus():
    text = data.builtin_corpus()
    assert isinstance(text, str) and len(text) > 400_000
    assert data.load_corpus(None) == text == data.load_corpus("builtin")


def test_read_text_file_ok(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("héllo\n", encoding="utf-8")
    assert data.read_text_file(p) == "héllo\n"
    assert data.load_corpus(str(p)) == "héllo\n"


def test_read_text_file_errors(tmp_path):
    with pytest.raises(DataError) as e:
        data.read_text_file(tmp_path / "missing.txt")
    assert "missing.txt" in one_sentence(e)

    with pytest.raises(DataError) as e:
        data.read_text_file(tmp_path)
    assert "directory" in one_sentence(e)

    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError) as e:
        data.read_text_file(tmp_path / "empty.txt")
    assert "empty" in one_sentence(e)

    (tmp_path / "bad.txt").write_bytes(b"abc\xffdef")
    with pytest.raises(DataError) as e:
        data.read_text_file(tmp_path / "bad.txt")
    assert "byte offset 3" in one_sentence(e)


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_tagged():
    a = data.synthetic_corpus(500, seed=0)
    assert a == data.synthetic_corpus(500, seed=0)
    assert a != data.synthetic_corpus(500, seed=1)
    lines = a.splitlines()
    assert len(lines) == 500
    tags = {line.split(" ", 1)[0] for line in lines}
    assert tags == set(data.TASK_TAGS.values())
    assert data.load_corpus("synthetic") == data.synthetic_corpus()


def test_synthetic_examples_are_correct():
    for task, line in data.synthetic_examples(2000, seed=3):
        tag, body = line.split(" ", 1)
        assert tag == data.TASK_TAGS[task]
        if task == "arith":
            lhs, rhs = body.split("=")
            a, b = lhs.split("+")
            assert int(a) + int(b) == int(rhs)
        elif task == "copy":
            x, y = body.split("|")
            assert x == y
        elif task == "reverse":
            x, y = body.split("|")
            assert x[::-1] == y
        elif task == "brackets":
            s, label = body.split("|")
            assert label == ("ok" if synthetic._is_balanced(s) else "bad")
        else:
            assert body.endswith(" .")


def test_synthetic_subset_and_bad_task():
    lines = data.synthetic_corpus(100, tasks=("copy",)).splitlines()
    assert all(line.startswith("copy ") for line in lines)
    with pytest.raises(DataError) as e:
        data.synthetic_corpus(10, tasks=("copy", "poetry"))
    msg = one_sentence(e)
    assert "poetry" in msg and "arith" in msg and "grammar" in msg


# ---------------------------------------------------------------- token files


@pytest.mark.parametrize("high, dtype", [(65535, np.uint16), (70000, np.uint32)])
def test_save_load_tokens(tmp_path, high, dtype):
    ids = np.random.default_rng(0).integers(0, high, size=1000)
    ids[0] = high
    path = data.save_tokens(tmp_path / "t.bin", ids)
    back = data.load_tokens(path)
    assert isinstance(back, np.memmap) and back.dtype == dtype
    np.testing.assert_array_equal(back, ids)
    with pytest.raises(ValueError):
        back[0] = 1  # read-only


def test_tokens_edge_cases(tmp_path):
    assert len(data.load_tokens(data.save_tokens(tmp_path / "e.bin", []))) == 0
    with pytest.raises(DataError):
        data.save_tokens(tmp_path / "neg.bin", [1, -2])
    (tmp_path / "junk.bin").write_bytes(b"not a token file at all....")
    with pytest.raises(DataError) as e:
        data.load_tokens(tmp_path / "junk.bin")
    assert "not a minimoe token file" in one_sentence(e)


# ---------------------------------------------------------------- split / batch


def test_train_val_split():
    ids = np.arange(100)
    train, val = data.train_val_split(ids, 0.1)
    assert len(train) == 90 and len(val) == 10 and val[0] == 90
    with pytest.raises(DataError) as e:
        data.train_val_split(np.arange(5), 0.1)
    assert "5 tokens" in one_sentence(e)
    with pytest.raises(DataError):
        data.train_val_split(ids, 1.5)


def test_get_batch():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(ids, 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(y - x, 1)  # ids are consecutive integers
    x2, _ = data.get_batch(ids, 4, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    # exactly block_size + 1 tokens is enough: only one window exists
    x, y = data.get_batch(list(range(9)), 2, 8, np.random.default_rng(0))
    np.testing.assert_array_equal(x, [list(range(8))] * 2)


def test_get_batch_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError) as e:
        data.get_batch(np.arange(8), 2, 8, rng)
    assert "8 tokens" in one_sentence(e) and "block_size=8" in str(e.value)
    for b, t in [(0, 4), (2, 0), (2, 2.5)]:
        with pytest.raises(DataError):
            data.get_batch(np.arange(100), b, t, rng)
    with pytest.raises(DataError):
        data.get_batch(np.arange(100), 2, 4, 123)


# ---------------------------------------------------------------- download


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 with a random file and a text file."""
    www = tmp_path / "www"
    www.mkdir()
    payload = np.random.default_rng(0).bytes(50_000)
    (www / "blob.bin").write_bytes(payload)
    text = "To be, or not to be.\n" * 100
    (www / "input.txt").write_text(text, encoding="utf-8")
    handler = functools.partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield {"base": base, "payload": payload, "text": text, "httpd": httpd}
    httpd.shutdown()
    httpd.server_close()


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_download_then_offline(server, tmp_path):
    cache = tmp_path / "cache"
    dest = cache / "blob.bin"
    url = server["base"] + "/blob.bin"
    got = data.download(url, dest, sha256=sha(server["payload"]), size=len(server["payload"]), timeout=5)
    assert got == dest and dest.read_bytes() == server["payload"]
    assert os.listdir(cache) == ["blob.bin"]  # no temp files left behind

    server["httpd"].shutdown()
    server["httpd"].server_close()
    # the server is gone; a verified cached copy must be used without the network
    assert data.download(url, dest, sha256=sha(server["payload"]), timeout=5) == dest


def test_tinyshakespeare_from_local_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "envcache"))
    text = server["text"].encode()
    kw = dict(url=server["base"] + "/input.txt", sha256=sha(text), size=len(text), timeout=5)
    assert data.tinyshakespeare(**kw) == server["text"]
    assert (tmp_path / "envcache" / "tinyshakespeare.txt").is_file()
    server["httpd"].shutdown()
    server["httpd"].server_close()
    assert data.tinyshakespeare(**kw) == server["text"]


def test_download_wrong_checksum_leaves_nothing(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        data.download(server["base"] + "/blob.bin", cache / "blob.bin", sha256="0" * 64, timeout=5)
    msg = one_sentence(e)
    assert "0" * 64 in msg and sha(server["payload"]) in msg
    assert os.listdir(cache) == []


def test_download_http_error(server, tmp_path):
    cache = tmp_path / "cache"
    url = server["base"] + "/nope.txt"
    with pytest.raises(DataError) as e:
        data.download(url, cache / "nope.txt", timeout=5)
    assert url in one_sentence(e) and "404" in str(e.value)
    assert os.listdir(cache) == []


def test_download_server_down(tmp_path):
    with socket.socket() as s:  # find a port, then close it so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{port}/input.txt"
    with pytest.raises(DataError) as e:
        data.download(url, cache / "input.txt", sha256="0" * 64, timeout=5)
    assert url in one_sentence(e)
    assert os.listdir(cache) == []


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "a"))
    assert data.default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MINIMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert data.default_cache_dir() == tmp_path / "x" / "minimoe"
