"""Models larger than memory: decoder blocks read from the checkpoint's safetensors shards one at
a time, and results written block by block into new shards (llm-compressor's *sequential
onloading*, with the disk as the home of the weights).

* :class:`Shards`: single tensors read out of a folder's ``*.safetensors`` files with plain file
  reads (no memory map: pages of a mapped file count in the resident set until unmapped, so a
  pass over a mapped 6 GB file would look like 6 GB of memory);
* :class:`DiskModel`: the model built without weights (parameters on ``meta``; buffers such as
  rotary tables are real), whose blocks are materialised for their turn by :meth:`DiskModel.open`
  (the ``blocks=`` of :func:`~emprune.models.layerwise.prune_layerwise`) and released afterwards;
  embeddings and the final norm are loaded once (:meth:`DiskModel.load_outer`), the output head only
  where it is used;
* :class:`ShardWriter`: one output shard per block (and one for the rest), written as the blocks
  finish, named and indexed as ``save_pretrained`` does when the last one is in, so plain
  ``from_pretrained`` reads the folder;
* :func:`fits_in_memory`: whether the in-memory path has room (the CLI's default switch).

Peak memory is one block (in the compute dtype) plus the embeddings, the calibration activations
(which spill to a memory-mapped temporary file when large: :func:`~emprune.models.layerwise.buffer`)
and, for the OBS update, one Hessian.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..structure.layouts import find_layout

#: safetensors dtype names -> torch dtypes (the ones a checkpoint of a causal LM holds)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class Shards:
    """The tensors of a folder's safetensors checkpoint (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``), read one by one on demand.

    Only the headers are read on construction; a truncated file (its tensors run past its end)
    or an unknown dtype is refused there, in one line (``ValueError``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{self.folder}: no model.safetensors (or index): streaming reads safetensors "
                                    "checkpoints only")
        #: name -> (file, dtype, shape, first byte, end byte)
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            self._read_header(self.folder / name)

    def _read_header(self, path: Path) -> None:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise ValueError(f"{path} is not a complete safetensors file (bad header)")
            header = json.loads(f.read(n))
        base = 8 + n
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            if meta["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {key} has dtype {meta['dtype']}, which streaming does not read")
            start, end = meta["data_offsets"]
            if base + end > size:
                raise ValueError(f"{path} is not a complete safetensors file (truncated: {key} runs past its end)")
            self.entries[key] = (path, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]), base + start, base + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` (no data read)."""
        return self.entries[name][2]

    def nbytes(self) -> int:
        """Bytes of all tensors, as stored."""
        return sum(e[4] - e[3] for e in self.entries.values())

    def require(self, names: list[str]) -> None:
        """``KeyError`` (one line, naming the first missing) unless every tensor of ``names`` is here."""
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                           + ": its names do not match the model built from its config.json")

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The tensors ``names`` as stored (dtype and shape of the file), each its own CPU tensor."""
        self.require(names)
        return {n: self.load(n, self.entries[n][1]) for n in names}

    def load(self, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        """Tensor ``name`` in ``dtype`` (floating tensors; others as stored) on ``device``, read
        and cast in slices of about :data:`WRITE_CHUNK` bytes straight into the result: the
        stored copy is never held whole (a bf16 embedding read as float32 takes its float32 size,
        not one and a half times it)."""
        path, stored, shape, start, end = self.entries[name]
        out_dtype = dtype if stored.is_floating_point else stored
        out = torch.empty(shape, dtype=out_dtype)
        flat = out.view(-1)
        size = torch.empty((), dtype=stored).element_size()
        step = max(1, WRITE_CHUNK // size)
        with open(path, "rb") as f:
            f.seek(start)
            for s in range(0, flat.numel(), step):
                n = min(step, flat.numel() - s)
                raw = torch.empty(n * size, dtype=torch.uint8)
                if f.readinto(memoryview(raw.numpy())) != n * size:
                    raise ValueError(f"{path}: short read for {name} (file changed while reading?)")
                flat[s : s + n] = raw.view(stored)
        return out if device is None or device.type == "cpu" else out.to(device)


class GGUFTensors:
    """The tensors of a GGUF file by their transformers names, each de-quantised on demand: the
    same name map, de-quantisation and tensor processors (LLaMA's q/k un-permutation, Gemma's
    norm offset) as transformers' GGUF loader, one tensor at a time instead of all at once, so a
    quantised model is pruned with one block de-quantised at a time. The header is parsed once;
    each tensor's bytes are then read with plain file reads (no memory map left open, whose
    pages would count as resident)."""

    def __init__(self, path: Path, model: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, load_gguf_checkpoint)

        self.folder = path
        reader = GGUFReader(str(path))
        arch = str(reader.get_field("general.architecture").contents())
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
        to_hf = get_gguf_hf_weights_map(model, self.processor)
        #: transformers name -> (GGUF name, shape as transformers holds it, first byte, bytes,
        #: numpy dtype and shape of the raw data as gguf-py presents it, quantisation type)
        self.entries: dict[str, tuple[Any, ...]] = {}
        for t in reader.tensors:
            if t.name in to_hf:
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
                self.entries[to_hf[t.name]] = (t.name, shape, int(t.data_offset), int(t.n_bytes), t.data.dtype,
                                               tuple(t.data.shape), t.tensor_type)
        del reader

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self) -> int:
        return sum(e[3] for e in self.entries.values())

    def require(self, names: list[str]) -> None:
        """``KeyError`` (one line, naming the first missing) unless every tensor of ``names`` is here."""
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise KeyError(f"{self.folder}: the GGUF file has no tensor for {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def read(self, names: list[str]) -> dict[str, Tensor]:
        """The tensors ``names``, de-quantised to float32 (as transformers' loader gives them)."""
        import numpy as np
        from gguf import dequantize

        self.require(names)
        out: dict[str, Tensor] = {}
        with open(self.folder, "rb") as f:
            for n in names:
                gname, _, start, size, np_dtype, np_shape, qtype = self.entries[n]
                f.seek(start)
                raw = np.frombuffer(f.read(size), dtype=np_dtype).reshape(np_shape)
                res = self.processor.process(weights=dequantize(raw, qtype), name=gname,
                                             tensor_key_mapping={}, parsed_parameters={})
                out[n] = torch.from_numpy(np.copy(res.weights))
        return out

    def load(self, name: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        """Tensor ``name`` de-quantised (float32), then cast to ``dtype``."""
        t = _cast(self.read([name])[name], dtype)
        return t if device is None or device.type == "cpu" else t.to(device)


def skeleton(folder: Path, dtype: torch.dtype, shards: Shards | None) -> nn.Module:
    """The causal LM of ``folder/config.json`` with its parameters on ``meta`` (buffers real),
    in eval mode; a shrunk folder's per-layer widths come from the shards' shapes."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import fit_shapes

    if folder.suffix.lower() == ".gguf":
        config = AutoConfig.from_pretrained(folder.parent, gguf_file=folder.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    else:
        config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "emprune_shrunk", None) and shards is not None:
        fit_shapes(model, text, {n: shards.shape(n) for n in shards.entries}, dtype, device="meta")
    model.tie_weights()
    return model.eval()


def _unique_state(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state dict without the second name of a tied tensor (as ``save_pretrained``
    writes it: the first name, e.g. the input embedding, is kept)."""
    seen: set[int] = set()
    out = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = v
    return out


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


#: glibc's M_MMAP_THRESHOLD, fixed by :func:`return_freed_memory`
MMAP_THRESHOLD = 1 << 22


def return_freed_memory() -> bool:
    """Make glibc serve every allocation above :data:`MMAP_THRESHOLD` (4 MB) with its own memory
    map, so that a freed block's tensors go back to the system at once. By default glibc raises
    that threshold as large buffers are freed (up to 32 MB), after which the blocks' tensors
    come from its heap, which fragments and keeps growing: streaming a 0.5 B model then peaked at
    1.5 GB instead of 0.7 GB. Process-wide; does nothing off glibc. Returns whether it was set."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError, TypeError):
        return False


class DiskModel:
    """A causal LM whose weights stay in ``folder``'s safetensors shards (:class:`Shards`) or in a
    ``.gguf`` file (:class:`GGUFTensors`, de-quantised one tensor at a time).

    ``model`` is built without weights (:func:`skeleton`); :meth:`open` materialises one
    decoder block in ``dtype`` (the same values the in-memory path would hold: read as stored,
    then cast) for the body of a ``with`` and puts it back on ``meta`` afterwards, after
    ``on_done(i, block)`` (e.g. writing it) when the pass is the ``final`` one. ``device``: where
    the block is put for its turn (CPU by default, or a GPU).

    Refused in one line: GPT-2's ``Conv1D`` layout (its layers are swapped for ``nn.Linear``
    views for the whole run, which weights on ``meta`` cannot be)."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.folder = Path(folder).expanduser()
        gguf = self.folder.suffix.lower() == ".gguf"
        self.shards: Shards | GGUFTensors | None = None if gguf else Shards(self.folder)
        return_freed_memory()
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = skeleton(self.folder, dtype, self.shards)  # type: ignore[arg-type]
        if gguf:
            self.shards = GGUFTensors(self.folder, self.model)
        self.layout = find_layout(self.model)
        if self.layout.name == "gpt2":
            raise NotImplementedError("streaming from disk does not support GPT-2's Conv1D layout; load it in memory")
        self.layers: nn.ModuleList = self.model.get_submodule(self.layout.blocks)  # type: ignore[assignment]
        self.on_done: Callable[[int, nn.Module], None] | None = None
        #: where :meth:`add` hands tensors created after their blocks were written (set by the writer)
        self.on_add: Callable[[dict[str, Tensor]], None] | None = None

    def add(self, tensors: dict[str, Tensor]) -> None:
        """Write ``tensors`` (by their names in the model) that a job created after their blocks'
        turns, e.g. the zero biases a stock config asks for (``on_add``; refused when nothing
        writes this model)."""
        if self.on_add is None:
            raise RuntimeError("tensors added to a streamed model that nothing writes")
        self.on_add(tensors)

    def block_prefix(self, i: int) -> str:
        return f"{self.layout.blocks}.{i}."

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Give ``module`` (named ``prefix`` in the model) its weights from the shards, in place."""
        keys = list(_unique_state(module))
        self.shards.require([prefix + k for k in keys])
        module.load_state_dict({k: self.shards.load(prefix + k, self.dtype, self.device) for k in keys},
                               strict=False, assign=True)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Put ``module``'s weights back on ``meta`` (their memory is freed)."""
        module.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in _unique_state(module).items()},
                               strict=False, assign=True)
        if callable(getattr(module, "tie_weights", None)):  # the whole model: tied names share one tensor again
            module.tie_weights()

    @contextmanager
    def open(self, i: int, block: nn.Module, final: bool = True) -> Iterator[nn.Module]:
        """Block ``i`` materialised for the ``with`` body, then ``on_done`` (final pass) and released."""
        self.materialize(block, self.block_prefix(i))
        try:
            yield block
            if final and self.on_done is not None:
                self.on_done(i, block)
        finally:
            self.release(block)

    def outer_names(self, head: bool) -> list[str]:
        """Names of the tensors outside the decoder blocks (embeddings, final norm; the output
        head, when it is not tied to the embeddings, with ``head``)."""
        head_mod = self.model.get_output_embeddings()
        head_ids = {id(p) for p in head_mod.parameters()} if head_mod is not None else set()
        names = []
        emb_ids = {id(p) for p in self.model.get_input_embeddings().parameters()}
        for k, v in _unique_state(self.model).items():
            if k.startswith(self.layout.blocks + "."):
                continue
            if id(v) in head_ids and id(v) not in emb_ids and not head:
                continue
            names.append(k)
        return names

    def load_outer(self, head: bool = False) -> None:
        """Materialise everything outside the blocks (the output head only with ``head``)."""
        names = self.outer_names(head)
        self.shards.require(names)
        for n in names:  # one at a time, each read straight into its compute-dtype tensor
            self.model.load_state_dict({n: self.shards.load(n, self.dtype, self.device)}, strict=False, assign=True)
        self.model.tie_weights()

    def release_outer(self) -> None:
        """Put everything outside the blocks back on ``meta``."""
        sd = self.model.state_dict(keep_vars=True)
        self.model.load_state_dict({k: torch.empty_like(sd[k], device="meta") for k in self.outer_names(head=True)},
                                   strict=False, assign=True)
        self.model.tie_weights()

    @contextmanager
    def outer(self) -> Iterator[None]:
        """The embeddings (and final norm) materialised for the ``with`` body (the capture of block
        0's inputs), released afterwards: they are not held while the blocks run."""
        self.load_outer(head=False)
        try:
            yield
        finally:
            self.release_outer()

    def saved_cast(self, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
        """How a tensor is cast on its way to an output saved in ``dtype``: through the compute
        dtype first, as the in-memory path holds it (floating tensors only)."""
        return lambda t: _cast(_cast(t, self.dtype), dtype)

    def outer_groups(self) -> list[list[str]]:
        """The names of the tensors outside the blocks, grouped for writing: each one whose float32
        copy is larger than :data:`WRITE_CHUNK` alone (the embeddings, an untied head: a GGUF
        tensor is read de-quantised), the small ones together."""
        names = self.outer_names(head=True)
        size = {n: 4 * torch.Size(self.shards.shape(n)).numel() for n in names if n in self.shards}
        big = [[n] for n in names if size.get(n, 0) > WRITE_CHUNK]
        small = [n for n in names if size.get(n, 0) <= WRITE_CHUNK]
        return big + ([small] if small else [])

    def block_tensors(self, i: int, block: nn.Module) -> dict[str, Tensor]:
        """Block ``i``'s tensors as they are now, by their names in the model."""
        prefix = self.block_prefix(i)
        return {prefix + k: v.detach() for k, v in _unique_state(block).items()}


#: torch dtypes -> safetensors dtype names
_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

#: bytes cast and written at once by :func:`write_safetensors`
WRITE_CHUNK = 1 << 26


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                      cast: Callable[[Tensor], Tensor] | None = None, metadata: dict[str, str] | None = None) -> int:
    """Write ``tensors`` to a safetensors file at ``path``, each cast by ``cast`` (a dtype change
    only) on the way, in slices of about :data:`WRITE_CHUNK` bytes: no second copy of a tensor, cast
    or serialised, is ever held (``safetensors.torch.save_file`` serialises each tensor to bytes
    first). Returns the bytes of tensor data written."""
    cast = cast or (lambda t: t)
    entries, off = {}, 0
    for k, t in tensors.items():
        dtype = cast(t.reshape(-1)[:1]).dtype
        n = t.numel() * torch.empty((), dtype=dtype).element_size()
        entries[k] = {"dtype": _NAMES[dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    header = json.dumps({"__metadata__": metadata or {}, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for t in tensors.values():
            flat = t.detach().reshape(-1)
            step = max(1, WRITE_CHUNK // max(1, t.element_size()))
            for s in range(0, flat.numel(), step):
                part = cast(flat[s : s + step]).cpu().contiguous()
                f.write(memoryview(part.view(torch.uint8).numpy()))
    return off


class ShardWriter:
    """Safetensors shards written one call at a time into ``folder``; :meth:`finish` names them
    ``model-0000k-of-0000n.safetensors`` and writes ``model.safetensors.index.json`` (a single
    shard becomes ``model.safetensors``), as ``save_pretrained`` lays a folder out."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, Tensor], cast: Callable[[Tensor], Tensor] | None = None) -> None:
        """Write ``tensors`` (each cast by ``cast`` on the way: :func:`write_safetensors`) as the
        next shard now; nothing is kept."""
        if not tensors:
            return
        path = self.folder / f".part-{len(self.parts) + 1:05d}.safetensors"
        self.total += write_safetensors(path, tensors, cast, {"format": "pt"})
        self.parts.append((path, list(tensors)))

    def finish(self) -> list[str]:
        """Give the shards their final names and write the index; returns the file names."""
        n = len(self.parts)
        if n == 1:
            os.replace(self.parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map: dict[str, str] = {}
        names = []
        for k, (path, keys) in enumerate(self.parts, 1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.folder / name)
            names.append(name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names + ["model.safetensors.index.json"]


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v1 or v2), ``None`` without one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    tries = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.rstrip("/")
        if "memory" in controllers.split(","):
            for where in (path, ""):
                tries.append((f"/sys/fs/cgroup/memory{where}/memory.limit_in_bytes",
                              f"/sys/fs/cgroup/memory{where}/memory.usage_in_bytes"))
        elif controllers == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                tries.append((f"{root}{path}/memory.max", f"{root}{path}/memory.current"))
    for limit, usage in tries:
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < (1 << 60):
                return int(cap) - int(Path(usage).read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable``, lowered by this process's
    cgroup limit where one is set); ``None`` where it cannot be read."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def model_bytes(folder: str | os.PathLike, dtype: torch.dtype) -> int | None:
    """Bytes the weights of a safetensors folder or a GGUF file take in ``dtype`` (from the
    headers; ``None`` for a folder without safetensors or an unreadable file)."""
    size = torch.empty((), dtype=dtype).element_size()
    if Path(folder).suffix.lower() == ".gguf":
        try:
            from gguf import GGUFReader

            return sum(int(t.n_elements) for t in GGUFReader(str(folder)).tensors) * size
        except Exception:  # noqa: BLE001 - an unreadable file: unknown size (the load says why)
            return None
    try:
        shards = Shards(folder)
    except (OSError, ValueError):
        return None
    return sum(torch.Size(e[2]).numel() * (size if e[1].is_floating_point else e[1].itemsize)
               for e in shards.entries.values())


#: the in-memory path is taken while the model in its compute dtype takes at most this fraction
#: of the available memory (the rest: activations, the OBS Hessians, the saved copy)
FIT_FRACTION = 0.6


def fits_in_memory(folder: str | os.PathLike, dtype: torch.dtype) -> tuple[bool, int | None, int | None]:
    """``(fits, model bytes, available bytes)``: whether the model in ``dtype`` takes at most
    :data:`FIT_FRACTION` of the available memory (unknown sizes: assumed to fit)."""
    need, avail = model_bytes(folder, dtype), available_memory()
    if need is None or avail is None:
        return True, need, avail
    return need <= FIT_FRACTION * avail, need, avail


def describe(disk: DiskModel) -> dict[str, Any]:
    """What the report says about a streamed run."""
    return {"mode": "disk", "source": str(disk.folder.resolve()), "blocks": len(disk.layers),
            "stored_bytes": disk.shards.nbytes()}
