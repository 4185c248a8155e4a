"""Layer-wise calibration and pruning of a decoder-only LM (the Wanda/SparseGPT loop).

The inputs of decoder block 0 are captured once, with every block's own call arguments (masks
and rotary tables may differ per block, as in Gemma-3). Then, block by block:

1. the block runs over the calibration inputs with the observers' forward hooks on its target
   Linears (:meth:`emprune.criteria.Criterion.observe`: e.g. Wanda's input norms, the same hooks
   ``emprune.prune`` uses);
2. ``on_block`` decides and prunes the block's weights in place;
3. the block is re-run, so the next block is calibrated on the outputs of the already-pruned
   blocks before it.

Only one block's inputs and outputs are held at a time. A model too large for memory comes with
``device=`` a :class:`Blocks` (:class:`~emprune.models.stream.DiskModel`): its blocks live on disk (weights on
``meta``) and each is materialised for its turn; the capture then runs the model's own forward
with every block passed through (the other call arguments do not depend on the hidden states),
and the activations between blocks spill to a memory-mapped temporary file when they are large
(:func:`buffer`).
"""
from __future__ import annotations

import os
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from ..structure.layouts import block_linears, find_layout, linear_view
from .runtime import input_device

#: a block's call arguments besides its hidden states: ``(positional args, keyword args)``
Call = tuple[tuple[Any, ...], dict[str, Any]]

#: ``on_block(block_index, {full Linear name: module})``, called once per block after the
#: block has been observed; it prunes the block's weights in place
OnBlock = Callable[[int, dict[str, nn.Linear]], Any]


class Observer(Protocol):
    """Anything with a criterion's ``observe(targets)`` hooks (see :class:`~emprune.criteria.Criterion`)."""

    def observe(self, targets: dict[str, nn.Module]) -> Any: ...


@runtime_checkable
class Blocks(Protocol):
    """Where a model's decoder blocks live between their turns (e.g. on disk:
    :class:`~emprune.models.stream.DiskModel`). ``open(i, block, final)`` gives block ``i``
    ready to run for the body of a ``with``; ``final`` says whether this pass produces the result
    (a streamed model then writes the block out)."""

    def open(self, i: int, block: nn.Module, final: bool = True) -> AbstractContextManager[nn.Module]: ...

    def outer(self) -> AbstractContextManager[None]:
        """What the capture of block 0's inputs needs (the embeddings) ready for the ``with`` body."""
        ...


class _Reading:
    """A :class:`Blocks` whose every pass only reads (``final`` False): see :func:`reading`."""

    def __init__(self, blocks: Blocks) -> None:
        self.blocks = blocks

    def open(self, i: int, block: nn.Module, final: bool = True) -> AbstractContextManager[nn.Module]:
        return self.blocks.open(i, block, False)

    def outer(self) -> AbstractContextManager[None]:
        return self.blocks.outer()


def reading(device: Any) -> Any:
    """``device`` as a pass that only reads statistics sees it: a :class:`Blocks` then never
    treats the pass as the final one (a streamed model writes nothing); anything else unchanged."""
    return _Reading(device) if isinstance(device, Blocks) else device


#: activations between blocks spill to a memory-mapped temporary file when the two buffers
#: together would take more than this fraction of the available memory (CPU only)
SPILL_FRACTION = 0.25


def buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for the activations of every calibration sample at one block: in
    memory, or, on CPU when two of them would take more than :data:`SPILL_FRACTION` of the
    available memory, backed by a memory-mapped temporary file (deleted at once: the mapping keeps
    it alive until the tensor is freed; ``$TMPDIR`` chooses the disk)."""
    from .stream import available_memory

    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    avail = available_memory() if device.type == "cpu" else None
    if avail is None or 2 * nbytes <= SPILL_FRACTION * avail:
        return torch.empty(shape, dtype=dtype, device=device)
    fd, path = tempfile.mkstemp(prefix="emprune-activations-", suffix=".bin")
    try:
        os.ftruncate(fd, nbytes)
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return t.view(shape)


class _Caught(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's inputs are stored."""


@torch.no_grad()
def prune_layerwise(
    model: nn.Module,
    calib_tokens: torch.Tensor,
    targets: Literal["mlp", "linear"],
    on_block: OnBlock,
    observers: Sequence[Observer] = (),
    progress: bool = True,
    device: torch.device | str | Blocks | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Calibrate ``model`` block by block on ``calib_tokens`` ``[n, seqlen]`` and let ``on_block`` prune.

    ``observers`` gather their statistics of each block's targeted Linears (``targets``: mlp or
    linear) while the block runs over the calibration inputs; then ``on_block(i, linears)`` is
    called and must modify the weights in place (it may read the observers' statistics).

    GPT-2's ``Conv1D`` targets are handed to the observers and ``on_block`` as ``nn.Linear``
    views (see :func:`~emprune.llm.layouts.linear_view`) and are ``Conv1D`` again afterwards.

    ``device``: execution device for a model held elsewhere (e.g. on CPU): each block is moved
    there for its turn and moved back afterwards. Accelerate-dispatched models are run as they
    are (their hooks place inputs); blocks offloaded to ``meta`` are refused, since in-place
    pruning of offloaded weights would be lost.

    ``batch_size``: calibration samples run through a block at once (each block's own call
    kwargs, captured for one sample, broadcast over the batch). Batches of several samples make much
    larger matrix products, several times faster on CPU than one sample at a time; the
    statistics are the same sums (up to float rounding).

    ``device`` may also be a :class:`Blocks`: where the blocks live between their turns and how
    each is made ready for its turn (a model streamed from disk; :func:`reading` marks a pass
    that only reads statistics).

    Returns timings: ``seconds``, ``capture_seconds``, ``decide_seconds``, ``block_seconds``.
    """
    from tqdm.auto import tqdm

    if calib_tokens.ndim != 2:
        raise ValueError(f"calib_tokens must be [n_samples, seqlen], got shape {tuple(calib_tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layout = find_layout(model)
    layers = model.get_submodule(layout.blocks)
    blocks = device if isinstance(device, Blocks) else None
    dev = torch.device(device) if device is not None and blocks is None else None  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with _calibration_mode(model), linear_view(model):  # GPT-2's Conv1D as Linear: rows = output units
        names = {mod: name for name, mod in model.named_modules()}
        with blocks.outer() if blocks is not None else nullcontext():
            inps, kwargs = _capture_inputs(model, layers, calib_tokens, dev)
        timings: dict[str, Any] = {"capture_seconds": time.perf_counter() - t0, "decide_seconds": 0.0}
        outs = buffer(tuple(inps.shape), inps.dtype, inps.device)
        block_seconds = []
        for i in tqdm(range(len(layers)), desc="calibrate", disable=not progress, unit="block"):
            tb = time.perf_counter()
            turn = blocks.open(i, layers[i]) if blocks is not None else _on_device(layers[i], i, dev)
            with turn as block:
                linears = {names[mod]: mod for mod in block_linears(block, targets, layout).values()}
                with ExitStack() as hooks:
                    for obs in observers:
                        hooks.enter_context(obs.observe(linears))
                    called = hooks.enter_context(_calls(linears))
                    run_block(block, inps, kwargs[i], batch_size)
                if len(called) < len(linears):
                    raise RuntimeError(f"target Linears never called by their block: {sorted(set(linears) - called)}")
                td = time.perf_counter()
                on_block(i, linears)
                timings["decide_seconds"] += time.perf_counter() - td
                run_block(block, inps, kwargs[i], batch_size, outs)  # pruned outputs feed the next block
            inps, outs = outs, inps
            block_seconds.append(time.perf_counter() - tb)
    timings.update(
        seconds=time.perf_counter() - t0,
        block_seconds=block_seconds,
        blocks=len(layers),
        n_samples=int(calib_tokens.shape[0]),
        seqlen=int(calib_tokens.shape[1]),
        batch_size=int(batch_size),
    )
    return timings


@contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV cache for the duration; both restored afterwards."""
    config = getattr(model, "config", None)
    saved_cache = getattr(config, "use_cache", None)
    was_training = model.training
    try:
        if config is not None:
            config.use_cache = False
        model.eval()
        yield
    finally:
        if config is not None and saved_cache is not None:
            config.use_cache = saved_cache
        model.train(was_training)


@contextmanager
def _on_device(block: nn.Module, i: int, dev: torch.device | None) -> Iterator[nn.Module]:
    """``block`` moved to the execution device ``dev`` for its turn, and back afterwards
    (accelerate-dispatched blocks stay where their hooks put them)."""
    if any(p.device.type == "meta" for p in block.parameters()):
        raise NotImplementedError(
            f"block {i} has offloaded (meta) weights; load the model on CPU and pass device=... instead"
        )
    home = _param_device(block)
    moved = dev is not None and not hasattr(block, "_hf_hook") and home != dev
    if moved:
        block.to(dev)
    try:
        yield block
    finally:
        if moved:
            block.to(home)


@contextmanager
def _calls(mods: dict[str, nn.Module]) -> Iterator[set[str]]:
    """The set of names of ``mods`` that ran a forward pass inside the ``with`` block."""
    seen: set[str] = set()
    handles = [m.register_forward_hook(lambda *_, n=n: seen.add(n)) for n, m in mods.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_block(block: nn.Module, inps: torch.Tensor, call: Call, batch_size: int,
              outs: torch.Tensor | None = None) -> None:
    """Run ``block`` over ``inps`` in batches with its captured other arguments ``call``; store
    the hidden states in ``outs`` if given."""
    args, kwargs = call
    for j in range(0, inps.shape[0], batch_size):
        y = block(inps[j : j + batch_size], *args, **kwargs)
        if outs is not None:
            outs[j : j + batch_size] = _hidden(y)


def _capture_inputs(
    model: nn.Module, layers: nn.ModuleList, calib_tokens: torch.Tensor, dev: torch.device | None
) -> tuple[torch.Tensor, list[Call]]:
    """Block 0's hidden-state inputs for every sample, and every block's own other call arguments.

    Forward pre-hooks (not a replaced module, as in Wanda's ``Catcher``) store the inputs, so
    accelerate hooks stay untouched. The kwargs transformers passes (attention_mask,
    position_ids, position_embeddings, ...) are identical for equal-length unpadded samples but
    may differ from block to block (and GPT-2 passes its mask positionally, after the hidden
    states: positional arguments are kept too): Gemma-3 gives its sliding-window layers another mask and
    another rotary table (base 10k) than its full-attention layers (base 1M). So sample 0 runs
    through every block once and each block's kwargs are kept; the other samples stop at
    block 0 (the hook raises once it has their hidden states).
    """
    kws: list[Call | None] = [None] * len(layers)
    store: dict[str, Any] = {"stop": False}

    def keep_kwargs(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if i == 0:
                store["hidden"] = args[0] if args else kwargs["hidden_states"]
            if kws[i] is None:
                kws[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            # other samples stop at block 0; sample 0 at the last block (every block's kwargs are
            # known then: no final norm, no vocabulary-sized logits)
            if (i == 0 and store["stop"]) or i == len(layers) - 1:
                raise _Caught
        return hook

    handles = [layer.register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i, layer in enumerate(layers)]
    inps = None
    stack = ExitStack()
    stack.enter_context(passed_through(layers))
    try:
        in_dev = input_device(model)
        for j in range(calib_tokens.shape[0]):
            store["stop"] = j > 0  # sample 0 runs through every block: their kwargs
            store.pop("hidden", None)
            try:
                model(calib_tokens[j : j + 1].to(in_dev), use_cache=False)
            except _Caught:
                pass
            if "hidden" not in store or any(k is None for k in kws):
                raise RuntimeError("a decoder block was never called during the forward pass")
            hidden = store["hidden"][0]
            if inps is None:  # allocated once: [n, seqlen, hidden] on the execution device
                target = dev or hidden.device
                inps = buffer((calib_tokens.shape[0], *hidden.shape), hidden.dtype, target)
            inps[j] = hidden
    finally:
        stack.close()
        for h in handles:
            h.remove()
    return inps, [_to_device(k, inps.device) for k in kws]  # type: ignore[arg-type]


def _hidden(output: Any) -> torch.Tensor:
    """Hidden states from a decoder block's output (a tensor in transformers 5, a tuple in 4.x)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _param_device(module: nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU for a parameter-free module)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _meta(block: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in block.parameters())


@contextmanager
def passed_through(layers: nn.ModuleList, feed: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Every block whose weights are on ``meta`` (a model streamed from disk) returns its hidden
    states unchanged for the duration (its hooks still fire), so the model's own forward computes
    the embeddings and every block's other arguments without the blocks' weights. With ``feed``,
    block 0 returns ``feed["hidden"]`` instead: the model's forward then finishes (final norm)
    from hidden states computed block by block."""
    patched = []

    def through(first: bool) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            if first and feed is not None:
                return feed["hidden"]
            return args[0] if args else kwargs["hidden_states"]
        return forward

    try:
        for i, block in enumerate(layers):
            if _meta(block):
                block.forward = through(i == 0)  # an instance attribute shadows the class's forward
                patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward


@torch.no_grad()
def run_blocks(model: nn.Module, tokens: torch.Tensor, blocks: Blocks, batch_size: int = 8,
               progress: bool = True) -> torch.Tensor:
    """The hidden states after the last decoder block for every row of ``tokens`` ``[n, seqlen]``,
    computed block by block (each block opened once, in ``batch_size`` rows at a time: the same
    calls as the whole model's forward over batches of ``batch_size``): how a model streamed from
    disk is evaluated. Returns ``[n, seqlen, hidden]`` (before the final norm)."""
    from tqdm.auto import tqdm

    layers = model.get_submodule(find_layout(model).blocks)
    with block_inputs(model, tokens, blocks) as (inps, kwargs):
        outs = buffer(tuple(inps.shape), inps.dtype, inps.device)
        for i in tqdm(range(len(layers)), desc="blocks", disable=not progress, unit="block"):
            with blocks.open(i, layers[i], False) as block:
                run_block(block, inps, kwargs[i], batch_size, outs)
            inps, outs = outs, inps
    return inps


@contextmanager
def block_inputs(model: nn.Module, tokens: torch.Tensor, blocks: Blocks) -> Iterator[tuple[torch.Tensor, list[Call]]]:
    """For the ``with`` body, in eval mode without a KV cache: block 0's hidden-state inputs for
    every row of ``tokens`` ``[n, seqlen]`` (a :func:`buffer`) and each block's other call
    arguments (a :data:`Call` per block, for :func:`run_block`), captured with the embeddings of
    ``blocks`` (a model streamed from disk: :meth:`Blocks.outer`) held only while they are read."""
    layers = model.get_submodule(find_layout(model).blocks)
    with _calibration_mode(model):
        with blocks.outer():
            inps, kwargs = _capture_inputs(model, layers, tokens, None)
        yield inps, kwargs
