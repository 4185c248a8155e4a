"""The default texts ship inside the package: present, intact, licensed, found with no setup.

No transformers needed: these are the files every ``emprune prune/eval/demo`` starts from.
"""
from __future__ import annotations

import fnmatch
import hashlib
import lzma
import sys
from pathlib import Path

import pytest

from emprune.models import data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["calib", "eval"])
def test_packaged_text_is_the_published_file(kind, monkeypatch):
    monkeypatch.delenv("EMPRUNE_DATA", raising=False)
    path = data.default_text_path(kind)
    assert path == data.packaged_text_path(kind) and path.parent == data.PACKAGED_DIR
    raw = lzma.decompress(path.read_bytes())
    # the SHA-256 of WikiText-2's split as published (see texts/README.md for provenance)
    assert hashlib.sha256(raw).hexdigest() == data.SHA256[kind]
    text = data.load_text(kind=kind)
    assert "\r" not in text and text == raw.decode("utf-8").replace("\r\n", "\n")
    assert len(text) > 1_000_000  # the whole split, not a sample


def test_texts_carry_attribution_and_licence():
    note = (data.PACKAGED_DIR / "README.md").read_text()
    for needed in ("Merity", "1609.07843", "CC BY-SA 3.0", "creativecommons.org/licenses/by-sa/3.0",
                   data.SHA256["calib"], data.SHA256["eval"]):
        assert needed in note, needed


def test_package_data_globs_cover_every_text_file():
    """pyproject's package-data lists every file of texts/ (else a wheel would ship without it)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = cfg["emprune.models"]
    files = [p.relative_to(data.PACKAGED_DIR.parent).as_posix() for p in data.PACKAGED_DIR.iterdir()]
    assert sorted(files) == sorted(["texts/README.md", "texts/wiki.test.raw.xz", "texts/wiki.valid.tokens.xz"])
    for f in files:
        assert any(fnmatch.fnmatch(f, g) for g in globs), f


def test_env_override_plain_or_xz(monkeypatch, tmp_path):
    (tmp_path / "wiki.valid.tokens.xz").write_bytes(lzma.compress(b"calib \xc3\xa9\r\nline\n"))
    monkeypatch.setenv("EMPRUNE_DATA", str(tmp_path))
    assert data.default_text_path("calib") == tmp_path / "wiki.valid.tokens.xz"
    assert data.load_text(kind="calib") == "calib \u00e9\nline\n"
    with pytest.raises(FileNotFoundError, match=r"EMPRUNE_DATA=.* holds no wikitext-2/wiki.test.raw.*--eval-text"):
        data.load_text(kind="eval")  # an override that lacks a file never falls back in silence
    monkeypatch.setenv("EMPRUNE_DATA", "")  # empty counts as unset
    assert data.default_text_path("eval") == data.packaged_text_path("eval")


def test_explicit_file_wins_over_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("EMPRUNE_DATA", str(tmp_path / "absent"))
    f = tmp_path / "mine.txt"
    f.write_text("my own text\n")
    assert data.load_text(f, kind="eval") == "my own text\n"


def test_bad_text_files_name_the_option(tmp_path):
    bad_xz = tmp_path / "t.txt.xz"
    bad_xz.write_bytes(b"not xz at all")
    with pytest.raises(ValueError, match="--calib-text: .*not a valid .xz file"):
        data.load_text(bad_xz, kind="calib")
    latin1 = tmp_path / "t.txt"
    latin1.write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match="--eval-text: .*not UTF-8 text"):
        data.load_text(latin1, kind="eval")


def test_missing_package_data_says_reinstall(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "PACKAGED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="installation is incomplete.*--eval-text"):
        data.packaged_text_path("eval")
