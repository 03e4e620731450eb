"""`stairs-export`: maps arguments onto export.export_model, nothing more."""

from __future__ import annotations

import argparse
import sys

from export import ExportError, Terminated, export_model
from export.core import ASSISTANT_DTYPE, DTYPES
from export.graphs import DEFAULT_OPSET, MIN_OPSET
from export.memory import GIB, peak_bytes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stairs-export", description=__doc__)
    p.add_argument("model", help="hub name (t5-3b, google/flan-t5-large) or local HF folder")
    p.add_argument("-o", "--output", help="output folder (default models/<name>/)")
    p.add_argument(
        "--assistant",
        default="auto",
        help="assistant model to export too; 'none' for none (default: registered one)",
    )
    _weight_options(p)
    p.add_argument(
        "--optimum",
        action="store_true",
        help="also write optimum's decoder_model.onnx and decoder_with_past_model.onnx (for "
        "other tools; the engine runs on the masked decoder and needs neither; default: off)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset of the graphs, {MIN_OPSET} to the newest this torch.onnx writes "
        f"(default: {DEFAULT_OPSET}; the files optimum writes with --optimum: optimum's own)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where optimum traces the files it writes with --optimum (default: %(default)s); "
        "the other graphs are traced on the CPU",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an output folder that is empty or a previous stairs export (default: off)",
    )
    p.add_argument(
        "--no-memory-check",
        action="store_true",
        help="export even when the machine has clearly less memory available than the export"
        " needs (by default it refuses before loading, naming the need) (default: off)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars or 'exporting' lines; the summary still prints (default: off)",
    )
    return p


def _weight_options(p: argparse.ArgumentParser) -> None:
    """The options that set the main's and the assistant's weights."""
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="the main model's dtype (default: %(default)s); int8/int4 quantize weights only "
        "(MatMulNBits, blockwise): a row's logits never depend on the rest of its batch",
    )
    p.add_argument(
        "--assistant-dtype",
        choices=DTYPES,
        default=ASSISTANT_DTYPE,
        help="the assistant's dtype, whatever --dtype is (default: %(default)s: its numbers "
        "never reach the output, the main checks every token; only acceptance changes)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        metavar="N",
        help="an int8/int4 main's quantization block along K: 16, 32, 64, 128 or 256 (default: "
        "int8 16, int4 32); larger is smaller in memory and less faithful (docs/quantization.md)",
    )
    p.add_argument(
        "--keep-fp32",
        metavar="PARTS",
        help="an int8/int4 main's parts kept fp32: a comma list of wo, lm_head, or none "
        "(default: int8 wo, int4 none); kept parts cost 4 bytes a weight (t5-3b's wo: 3.2 GB)",
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    a = _parser().parse_args(argv)
    quantization = {}
    if a.block_size is not None:
        quantization["block_size"] = a.block_size
    if a.keep_fp32 is not None:
        quantization["keep"] = a.keep_fp32  # a comma string, parsed where the API's is checked
    try:
        res = export_model(
            a.model,
            a.output,
            None if a.assistant == "none" else a.assistant,
            a.dtype,
            a.opset,
            a.device,
            a.force,
            a.quiet,
            a.assistant_dtype,
            optimum=a.optimum,
            quantization=quantization or None,
            memory_check=not a.no_memory_check,
        )
    except ExportError as exc:
        print(f"stairs-export: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated): exit as the shell would
        term = isinstance(exc, Terminated)
        why = "SIGTERM" if term else "Ctrl-C"
        print(f"stairs-export: interrupted ({why}); no partial output was left", file=sys.stderr)
        return 143 if term else 130
    for path, m in res.manifests.items():
        print(f"{path}: max abs diff {m['validation']['max_abs_diff']}")
    print(f"done in {res.seconds:.1f} s, peak memory {peak_bytes() / GIB:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
