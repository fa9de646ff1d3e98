"""A fresh install's first heavy call compiles the numba kernels (a minute of the README
example against 0.7 s warm) without a word; on a terminal it now says so, once."""

import sys

from scarletstore import startup


class _Tty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s


def test_notice_only_on_a_terminal_for_a_compiling_command_without_a_cache(monkeypatch, tmp_path):
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setattr(startup, "kernels_cached", lambda: False)
    startup.first_run_notice("info")
    assert tty.text == ""
    startup.first_run_notice("deblend")
    assert "compiling numba kernels" in tty.text and tty.text.count("\n") == 1
    tty.text = ""
    monkeypatch.setattr(startup, "kernels_cached", lambda: True)
    startup.first_run_notice("deblend")
    assert tty.text == ""


def test_a_cache_in_numba_cache_dir_counts(monkeypatch, tmp_path):
    (tmp_path / "deblend").mkdir()
    (tmp_path / "deblend" / "kernels._fit-10.py311.nbi").write_bytes(b"")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert startup.kernels_cached()
