"""Graphs traced from a T5 that holds no weights, the weights streamed from the checkpoint.

torch.onnx.export copies every weight into the graph it builds (pytorch #61263), so an export
that traces the real model holds the model and its graphs at once. Here the trace runs on a
hollow T5: each parameter a stride-0 view of one number, the number naming the parameter's class
of equal checkpoint tensors. The exporter's constant folding (each Linear weight transposed for
its MatMul) and its deduplication of equal initializers then give the real model's graph, node
for node. The graph is exported without weights (export_params=False); the initializers the
exporter computed are recorded, their class and strides say which checkpoint tensor each is and
whether it is transposed, and onnx's external-data writer fills them in from the checkpoint one
tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
from pathlib import Path

from . import graphs
from .errors import CheckpointError, ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class Checkpoint:
    """A safetensors checkpoint (one file, else shards with an index, the order from_pretrained
    looks in), read one tensor at a time: each read opens its file, copies the tensor out and
    closes it, so no mapping of the checkpoint stays."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        try:
            if (self.folder / SINGLE).is_file():
                with safe_open(str(self.folder / SINGLE), "pt") as f:
                    self.files = dict.fromkeys(f.keys(), self.folder / SINGLE)
            else:
                index = json.loads((self.folder / INDEX).read_text())
                self.files = {k: self.folder / f for k, f in index["weight_map"].items()}
        except Exception as exc:
            raise CheckpointError(f"cannot load the checkpoint in {self.folder}: {exc}") from exc

    @staticmethod
    def present(folder: Path) -> bool:
        """Does folder hold safetensors weights (one file or an index of shards)?"""
        return (Path(folder) / SINGLE).is_file() or (Path(folder) / INDEX).is_file()

    @classmethod
    def find(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in folder, or None when it has no safetensors weights."""
        return cls(Path(folder)) if cls.present(folder) else None

    def get(self, key: str):
        """The tensor `key` as float32 numpy (bf16/fp16 upcast as from_pretrained does)."""
        import torch

        with self._open(key) as f:
            t = f.get_tensor(key)
        return t.to(torch.float32, copy=True).numpy()

    def fingerprint(self, key: str) -> tuple:
        """Shape and the values of the first and last row (a vector's first and last 8), read as
        two slices: equal tensors share it, so only tensors that do are read whole to compare.
        Values, not bytes: -0.0 and 0.0 compare equal, NaN never does, as in torch.equal."""
        import torch

        with self._open(key) as f:
            s = f.get_slice(key)
            shape = tuple(s.get_shape())
            if not shape or 0 in shape:
                return (shape, tuple(f.get_tensor(key).to(torch.float32).reshape(-1).tolist()))
            n = shape[0]
            edge = 1 if len(shape) > 1 else min(8, n)
            ends = [s[:edge], s[n - edge : n]]
        return (shape, *(tuple(e.to(torch.float32).reshape(-1).tolist()) for e in ends))

    def header(self, key: str) -> tuple[tuple, str]:
        """(shape, safetensors dtype) of `key`, read from its file's header."""
        with self._open(key) as f:
            s = f.get_slice(key)
            return tuple(s.get_shape()), s.get_dtype()

    @contextlib.contextmanager
    def _open(self, key: str):
        from safetensors import safe_open

        try:
            with safe_open(str(self.files[key]), "pt") as f:
                yield f
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{self.folder}: cannot read {key}: {exc}") from exc


def equal_classes(ckpt: Checkpoint, keys: list[str]) -> dict[str, int]:
    """Checkpoint key -> its class (1, 2, ...): keys of equal tensors (same shape, values equal as
    torch.equal sees them) share one, as the exporter's deduplication merges them; keys: those the
    model uses. Each key's fingerprint finds its candidates; only a key with candidates is read
    whole, one candidate at a time beside it."""
    import numpy as np

    classes: dict[str, int] = {}
    leaders: dict[tuple, list[str]] = {}  # fingerprint -> first key of each class with it
    for key in keys:
        tip = ckpt.fingerprint(key)
        candidates = leaders.setdefault(tip, [])
        a = ckpt.get(key) if candidates else None
        same = next((k for k in candidates if np.array_equal(ckpt.get(k), a)), None)
        if same is None:
            candidates.append(key)
            classes[key] = len(classes) + 1
        else:
            classes[key] = classes[same]
        del a
    return classes


FLOATS = {"F16", "BF16", "F32", "F64"}  # what from_pretrained upcasts; integers are refused


def _config(src: Path):
    """src's T5Config as from_pretrained(dtype=torch.float32) leaves it (what the export writes)."""
    import torch
    from transformers import T5Config

    cfg = T5Config.from_pretrained(src)
    cfg._name_or_path = str(src)
    cfg.dtype = torch.float32
    return cfg


def _with_generation_config(model, src: Path):
    from transformers import GenerationConfig

    if (Path(src) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(src)
    return model


def load_model(src: Path, ckpt: Checkpoint):
    """T5ForConditionalGeneration of src in float32, as from_pretrained loads it, but built
    tensor by tensor: only the float32 model is ever in memory, never the checkpoint beside it."""
    import torch

    model, plan = _plan(_config(src), ckpt)
    _assign(model, plan, lambda key, shape: torch.from_numpy(ckpt.get(key)))
    return _with_generation_config(model, src)


def reference_model(src: Path, ckpt: Checkpoint):
    """T5ForConditionalGeneration of src whose weights stay in the checkpoint: each module's own
    parameters are read in float32 just before it runs and dropped when it returns, so the
    reference outputs hold one module's weights at a time, not the model. Its outputs are the
    loaded model's, bit for bit (the same float32 values through the same modules)."""
    model, plan = _plan(_config(src), ckpt)
    key_of = {name: key for names, key, _ in plan for name in names}
    for prefix, module in model.named_modules():
        own = {
            attr: key_of[f"{prefix}.{attr}" if prefix else attr]
            for attr, p in module._parameters.items()
            if p is not None
        }
        if own:
            module.register_forward_pre_hook(_Fill(ckpt, own))
            module.register_forward_hook(_Empty(dict(module._parameters)), always_call=True)
    for stack in (model.encoder, model.decoder):
        stack.register_forward_hook(_release, always_call=True)
    return _with_generation_config(model, src)


def _release(module, args, output) -> None:
    """After each encoder or decoder pass: the weights it read and dropped go back to the
    system, so they do not pile up in the heap over the references' many passes."""
    from .memory import release

    release()


class _Fill:
    """A forward pre-hook giving a module its parameters from the checkpoint (attr -> key)."""

    def __init__(self, ckpt: Checkpoint, own: dict[str, str]):
        self.ckpt, self.own = ckpt, own

    def __call__(self, module, args):
        import torch

        for attr, key in self.own.items():
            real = torch.from_numpy(self.ckpt.get(key))
            module._parameters[attr] = torch.nn.Parameter(real, requires_grad=False)


class _Empty:
    """A forward hook giving a module back its weightless (meta) parameters."""

    def __init__(self, hollow: dict):
        self.hollow = hollow

    def __call__(self, module, args, output):
        module._parameters.update(self.hollow)


def hollow_model(cfg, ckpt: Checkpoint):
    """A T5ForConditionalGeneration of cfg whose every parameter is a view of one float (its
    class in the checkpoint) over a row of its last dimension, and {class: checkpoint key}.
    A view's strides tell a transposed use from a plain one."""
    import torch

    model, plan = _plan(cfg, ckpt)
    classes = equal_classes(ckpt, [key for _, key, _ in plan])

    def hollow(key, shape):
        if math.prod(shape) < 2:  # a one-element view would carry no telling stride
            raise CheckpointError(f"{ckpt.folder}: {key} {shape} cannot be streamed")
        # a row over the last dimension: strides (0, 1), transposed (1, 0); a vector: (0,)
        row = torch.full(shape[-1:] if len(shape) > 1 else (1,), float(classes[key]))
        return row.expand(shape)

    _assign(model, plan, hollow)
    by_class = {}
    for key, c in classes.items():
        by_class.setdefault(c, key)
    return model, by_class


def _plan(cfg, ckpt: Checkpoint) -> tuple:
    """A T5ForConditionalGeneration of cfg on the meta device and, for each of its parameters
    (tied ones once), (its names, the checkpoint key that fills it, its shape), checked against
    the checkpoint's header: present, of that shape, a float dtype."""
    import torch
    from transformers import T5ForConditionalGeneration

    if getattr(cfg, "quantization_config", None):
        raise CheckpointError(f"{ckpt.folder}: a quantized checkpoint is not exported")
    with torch.device("meta"):
        model = T5ForConditionalGeneration(cfg).eval()
    if any(True for _ in model.buffers()):
        raise CheckpointError(f"{ckpt.folder}: a T5 with buffers is not streamed")
    groups: dict[int, list[str]] = {}
    shapes = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        shapes[id(p)] = tuple(p.shape)
    plan = []
    for ident, names in groups.items():
        key = next((n for n in names if n in ckpt.files), None)
        if key is None:
            raise CheckpointError(f"{ckpt.folder}: no weights for {' / '.join(names)}")
        shape, dtype = ckpt.header(key)
        if shape != shapes[ident] or dtype not in FLOATS:
            raise CheckpointError(
                f"{ckpt.folder}: {key} is {dtype} {shape}; the config needs floats {shapes[ident]}"
            )
        plan.append((names, key, shapes[ident]))
    return model, plan


def _assign(model, plan: list, make) -> None:
    """Each planned parameter of model replaced by make(checkpoint key, shape), tied ones by
    one tensor."""
    import torch

    for names, key, shape in plan:
        param = torch.nn.Parameter(make(key, shape), requires_grad=False)
        for name in names:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


_RECORDING = threading.Lock()  # one export at a time replaces torch's pass


@contextlib.contextmanager
def recorded_initializers():
    """Record the initializers torch.onnx.export computes (after constant folding and
    deduplication) while exporting without them: yields the dict it fills, name -> tensor."""
    import torch

    found: dict = {}
    with _RECORDING:
        original = torch._C._jit_pass_onnx_deduplicate_initializers

        def record(graph, params, training):
            out = original(graph, params, training)
            found.clear()
            found.update(out)
            return out

        torch._C._jit_pass_onnx_deduplicate_initializers = record
        try:
            yield found
        finally:
            torch._C._jit_pass_onnx_deduplicate_initializers = original
    if not found:
        raise ConversionError("torch.onnx.export no longer reports its initializers: not streamed")


class Weights:
    """Where a hollow model's weights come from: the checkpoint and its classes."""

    def __init__(self, ckpt: Checkpoint, by_class: dict[int, str]):
        self.ckpt, self.by_class = ckpt, by_class

    def value(self, name: str, t):
        """The real value of a recorded initializer: a constant the trace computed (its own
        value), or a hollow weight (its checkpoint tensor, transposed if its strides are)."""
        if t.numel() < 2 or 0 not in t.stride():
            if t.is_floating_point() and t.numel() > 1:  # the hollow model's floats are views
                raise ConversionError(f"initializer {name}: computed from weights, not traced")
            return t.detach().contiguous().numpy()
        c = float(t[(0,) * t.ndim])
        key = self.by_class.get(int(c)) if c == int(c) else None
        if key is None:
            raise ConversionError(f"initializer {name}: computed from weights in a way not traced")
        a = self.ckpt.get(key)
        if t.ndim == 2 and t.stride() == (1, 0):  # the row view transposed: W.T for a MatMul
            a = a.T.copy()
        elif t.stride() != (0,) * (t.ndim - 1) + ((1,) if t.ndim > 1 else (0,)):
            raise ConversionError(f"initializer {name}: a view of {key} not traced")
        if a.shape != tuple(t.shape):
            raise ConversionError(f"initializer {name}: {key} is {a.shape}, not {tuple(t.shape)}")
        return a

    def write(self, traced: Path, found: dict, path: Path) -> list[str]:
        """The graph traced without weights (traced) written to path with found's initializers,
        each read from the checkpoint in turn; one `name`_data file beside it when the weights
        are over EXTERNAL_BYTES. Returns the file names written."""
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(traced))
        graph = proto.graph
        keep = [i for i in graph.input if i.name not in found]
        # the exporter writes initializers in the order the graph takes them as inputs
        order = [i.name for i in graph.input if i.name in found]
        del graph.input[:]
        graph.input.extend(keep)
        total = sum(t.numel() * t.element_size() for t in found.values())
        data = path.name + "_data"
        external = total + traced.stat().st_size > graphs.EXTERNAL_BYTES  # as save_exported
        if external:
            (path.parent / data).write_bytes(b"")
        for name in order:
            tensor = numpy_helper.from_array(self.value(name, found[name]), name)
            if external:
                graphs.append_external(tensor, data, path.parent)
            graph.initializer.append(tensor)
        onnx.save_model(proto, str(path))
        return [path.name, data] if external else [path.name]
