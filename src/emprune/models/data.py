"""Text for calibration and perplexity: the texts shipped inside the package, local files, or
hub datasets (online).

The defaults ship with emprune (``emprune/models/texts/``, xz-compressed, CC BY-SA 3.0: see the
README there): the tokenised WikiText-2 *validation* split for calibration (disjoint from the
test split) and the raw *test* split for perplexity, the standard LLM pruning benchmark text.
So ``emprune prune``, ``eval``, ``compare`` and ``demo`` work from any folder after a plain
install. ``$EMPRUNE_DATA`` (a folder holding ``wikitext-2/``) and ``--calib-text`` /
``--eval-text`` override them.
"""
from __future__ import annotations

import lzma
import os
import random
from pathlib import Path
from typing import Any, Literal

import torch

#: the default texts, relative to a data root such as ``$EMPRUNE_DATA``
DEFAULT_FILES: dict[str, str] = {
    "calib": "wikitext-2/wiki.valid.tokens",
    "eval": "wikitext-2/wiki.test.raw",
}
#: the packaged copies of :data:`DEFAULT_FILES` (``<name>.xz``) and their licence note
PACKAGED_DIR = Path(__file__).resolve().with_name("texts")
#: SHA-256 of the uncompressed default files (the tests check the packaged copies against it)
SHA256: dict[str, str] = {
    "calib": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "eval": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
}
_OPTION = {"calib": "--calib-text", "eval": "--eval-text"}
#: hub datasets understood by ``load_text`` when online (Wanda's loaders)
HUB_NAMES = ("wikitext2", "c4")
#: offline English text that ships with Python itself (no download, no extra package):
#: ``python-docs`` is the Python Language Reference help text of ``pydoc_data.topics``
#: (~465 kB of prose with some code, PSF licence), used as "text other than WikiText".
BUILTIN_NAMES = ("python-docs",)


def packaged_text_path(kind: Literal["calib", "eval"]) -> Path:
    """The xz-compressed copy of the default ``kind`` text inside the installed package.

    A ``FileNotFoundError`` here means a broken installation (the package data was left out).
    """
    path = PACKAGED_DIR / (Path(DEFAULT_FILES[kind]).name + ".xz")
    if not path.is_file():
        raise FileNotFoundError(
            f"emprune's default {kind} text {path} is missing: the installation is incomplete "
            f"(reinstall emprune), or pass a text file with {_OPTION[kind]} PATH"
        )
    return path


def default_text_path(kind: Literal["calib", "eval"]) -> Path:
    """Path of the default calibration or evaluation text.

    ``$EMPRUNE_DATA``, when set, must hold the file (as ``wikitext-2/<name>`` or ``<name>``,
    optionally ``.xz``-compressed): an override that silently fell back to the packaged text
    would measure something other than what the user asked for. Otherwise the packaged copy.
    """
    env = os.environ.get("EMPRUNE_DATA")
    if not env:
        return packaged_text_path(kind)
    root, rel = Path(env).expanduser(), Path(DEFAULT_FILES[kind])
    for candidate in (root / rel, root / rel.name):
        for c in (candidate, candidate.with_name(candidate.name + ".xz")):
            if c.is_file():
                return c
    raise FileNotFoundError(
        f"EMPRUNE_DATA={env} holds no {rel} (nor {rel.name}, plain or .xz). Unset EMPRUNE_DATA to "
        f"use the texts shipped with emprune, or pass a text file with {_OPTION[kind]} PATH."
    )


def read_text_file(path: str | os.PathLike, kind: Literal["calib", "eval"] = "eval") -> str:
    """The UTF-8 text of a file, decompressed if it ends in ``.xz``, CRLF normalised to LF.

    Errors name the option the file came from (``--calib-text`` / ``--eval-text``).
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".xz":
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError as err:
            raise ValueError(f"{_OPTION[kind]}: {path} is not a valid .xz file ({err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{_OPTION[kind]}: {path} is not UTF-8 text (byte {err.start}: {err.reason})") from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(
    path_or_name: str | os.PathLike | None = None,
    kind: Literal["calib", "eval"] = "eval",
) -> str:
    """The text of a file (see :func:`read_text_file`), or of a hub dataset by name where online.

    ``None`` picks the default text for ``kind`` (:func:`default_text_path`). Names:
    ``python-docs`` (offline, see :func:`builtin_text`), ``wikitext2`` (train split for
    ``calib``, test split for ``eval``) and ``c4`` (these two need ``datasets`` and internet).
    """
    if path_or_name is None:
        path_or_name = default_text_path(kind)
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return read_text_file(path, kind)
    name = os.fspath(path_or_name)
    if name in BUILTIN_NAMES:
        return builtin_text(name)
    if name in HUB_NAMES:
        return _load_hub_text(name, kind)
    raise FileNotFoundError(
        f"{_OPTION[kind]}: {name!r} is neither a file nor one of the text names "
        f"{list(BUILTIN_NAMES + HUB_NAMES)}"
    )


def builtin_text(name: str = "python-docs") -> str:
    """Offline English text shipped with Python (see :data:`BUILTIN_NAMES`).

    ``python-docs``: every topic of ``pydoc_data.topics`` (the Language Reference sections that
    ``help("if")`` shows), in the module's order, joined by blank lines. Deterministic for a
    given Python version (3.11: 79 topics, 465,126 characters).
    """
    if name != "python-docs":
        raise ValueError(f"unknown built-in text {name!r}; choose from {list(BUILTIN_NAMES)}")
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise FileNotFoundError("this Python has no pydoc_data module; pass a text file instead") from err
    return "\n\n".join(topics.values())


def _load_hub_text(name: str, kind: str) -> str:
    """Join a hub dataset into one string the way Wanda's loaders do (needs internet)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(
            f"dataset {name!r} needs `pip install datasets` and internet; pass a local text file instead"
        ) from err
    try:
        if name == "wikitext2":
            split = "train" if kind == "calib" else "test"
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
            return "\n\n".join(rows)
        shard = "en/c4-train.00000-of-01024.json.gz" if kind == "calib" else "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={"x": shard}, split="x")["text"]
        return "\n\n".join(rows[:1100] if kind == "eval" else rows)  # Wanda evaluates the first 1100 docs
    except Exception as err:  # network/hub errors come in many types
        raise RuntimeError(
            f"could not download dataset {name!r} (offline?); pass a local text file instead. Cause: {err}"
        ) from err


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of a whole text as a 1-D LongTensor (the tokenizer's default special tokens)."""
    # one long sequence on purpose: silence the "longer than model max length" warning
    saved, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = saved
    return ids.long()


def calibration_batches(tokenizer: Any, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens, ``[n_samples, seqlen]``, as in Wanda/SparseGPT.

    Window starts are drawn uniformly with a private RNG seeded by ``seed`` (global random
    state is left alone), so the same seed gives the same batches.
    """
    return calibration_windows(tokenize(tokenizer, text), n_samples, seqlen, seed)


def calibration_windows(ids: torch.Tensor, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """:func:`calibration_batches` from a text's token ids (already tokenized, e.g. to check
    its length before the model was loaded)."""
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples and seqlen must be >= 1, got {n_samples}, {seqlen}")
    ids = ids.reshape(-1)
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens; need more than seqlen={seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_tokens(tokenizer: Any, text: str, n_tokens: int | None = None) -> torch.Tensor:
    """The first ``n_tokens`` token ids of ``text`` (all of them for ``None``) as a 1-D LongTensor."""
    ids = tokenize(tokenizer, text)
    if n_tokens is not None:
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        ids = ids[:n_tokens]
    return ids
