"""Writing ONNX graph files, shared by every stage that writes one (masked, fp16, quantize, the
manifest): the opset range, where weights go (inline or one external data file), file modes and
the graph metadata. A leaf: it imports nothing else from export/ but its errors.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.layout import EXPORT_ID_KEY, QUERY_ROWS_KEY

from .errors import OptionError

DEFAULT_OPSET = 17
# T5's attention mask is built with aten::triu, which torch.onnx exports from opset 14 on
# (tried: 13 and below fail inside torch.onnx or ONNX Runtime).
MIN_OPSET = 14
# A graph with more weight bytes than this is written with one external data file beside it:
# ONNX Runtime then holds its weights once (inside the protobuf they sit in memory twice while
# it loads: 2.15 GB anonymous RSS for a 1.44 GB decoder), and protobuf's 2 GB cap never applies.
EXTERNAL_BYTES = 256 << 20
INLINE_BYTES = 1024  # onnx.save_model's size_threshold: smaller tensors stay in the graph


def max_opset() -> int:
    """The newest opset torch.onnx's TorchScript exporter (the one optimum uses) writes."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return int(ONNX_MAX_OPSET)
    except (ImportError, AttributeError, TypeError, ValueError):  # moved: torch 2.13's value
        return 23


def check_opset(opset, option: str = "--opset") -> None:
    """Refuse an opset outside MIN_OPSET..max_opset() (stairs-export's and the masked decoder's
    export share this range); option names it in the message."""
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise OptionError(
            f"{option} must be between {MIN_OPSET} and {hi}, not {opset!r} (T5 needs opset "
            f"{MIN_OPSET} or newer; {hi} is the newest this torch.onnx writes)"
        )


def follow_umask(path: Path) -> None:
    """Give a written file the mode the umask allows (onnx writes external data 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_graph(model, path: Path, external: bool) -> None:
    """Write an ONNX model over path (a previous data file of path removed first), its weights
    in one `name`_data file beside it if external; every file follows the umask."""
    import onnx

    for old in path.parent.glob(path.name + "*data"):
        old.unlink()
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=path.name + "_data",
    )
    for f in (path, path.parent / (path.name + "_data")):
        if f.is_file():
            follow_umask(f)


def append_external(tensor, location: str, folder: Path) -> None:
    """Move tensor's bytes to the end of folder/location, as onnx.save_model writes external
    data (a tensor under INLINE_BYTES stays inline)."""
    import sys

    from onnx import external_data_helper as ext

    if tensor.HasField("raw_data") and sys.getsizeof(tensor.raw_data) >= INLINE_BYTES:
        ext.set_external_data(tensor, location)
        ext.save_external_data(tensor, str(folder))
        tensor.ClearField("raw_data")


def save_exported(tmp_dir: Path, name: str, out_dir: Path) -> list[str]:
    """Move the exported `name` from tmp_dir to out_dir, its weights in one `name`_data file
    when it is over EXTERNAL_BYTES (or torch wrote external data). Returns the file names."""
    import onnx

    written = [name]
    if len(list(tmp_dir.iterdir())) > 1 or (tmp_dir / name).stat().st_size > EXTERNAL_BYTES:
        proto = onnx.load(str(tmp_dir / name))  # loads the external tensors
        packed = tmp_dir / "packed"
        packed.mkdir()
        onnx.save_model(
            proto,
            str(packed / name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=name + "_data",
        )
        del proto
        src = packed
        if (packed / (name + "_data")).is_file():  # absent when every tensor was small
            written.append(name + "_data")
    else:
        src = tmp_dir
    for f in reversed(written):  # the data file first, so the graph never names a missing one
        follow_umask(src / f)
        os.replace(src / f, out_dir / f)
    return written


def mark_query_rows(path: Path) -> None:
    """Record in the graph's metadata that its attention multiplies each query alone (the engine
    then pads only one-row, one-token calls to two tokens; graphs without it get every row
    padded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if not any(p.key == QUERY_ROWS_KEY for p in proto.metadata_props):
        proto.metadata_props.add(key=QUERY_ROWS_KEY, value="1")
        onnx.save_model(proto, str(path))


def mark_export_id(path: Path, export_id: str) -> None:
    """Record in the graph's metadata the id its export gives all its graphs (the engine refuses
    a folder whose graphs name different exports); its external data file is not rewritten."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    kept = [p for p in proto.metadata_props if p.key != EXPORT_ID_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    proto.metadata_props.add(key=EXPORT_ID_KEY, value=export_id)
    onnx.save_model(proto, str(path))
