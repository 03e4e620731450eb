"""Peers: Hugging Face PyTorch, optimum ONNX Runtime, CTranslate2 — same prompts, greedy.

Each method maps encoder input ids to generated ids (EOS and padding stripped) and optional stats;
HF and CTranslate2 also take a batch of prompts at once (`greedy_batch`, for bench.batch).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from engine.layout import CONFIG_FILE, GENERATION_CONFIG_FILE, SPIECE_FILE

EOS = 1


def strip(ids, eos: int = EOS, pad: int = 0) -> list[int]:
    """Generated ids up to (not including) EOS; trailing padding removed."""
    out = [int(i) for i in ids]
    if eos in out:
        out = out[: out.index(eos)]
    while out and out[-1] == pad:
        out.pop()
    return out


class HF:
    """transformers generate(): greedy, and with assistant_model."""

    def __init__(self, main_dir: Path, assistant_dir: Path | None, threads: int):
        import torch
        from transformers import T5ForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = T5ForConditionalGeneration.from_pretrained(
            main_dir, dtype=torch.float32
        ).eval()
        self.assistant = None
        if assistant_dir is not None:
            self.assistant = T5ForConditionalGeneration.from_pretrained(
                assistant_dir, dtype=torch.float32
            ).eval()

    def greedy(self, ids, max_new: int):
        with self.torch.no_grad():
            out = self.model.generate(
                self.torch.tensor([ids]), do_sample=False, num_beams=1, max_new_tokens=max_new
            )
        return strip(out[0, 1:].tolist())

    def greedy_batch(self, batch, max_new: int) -> list[list[int]]:
        """Greedy on several prompts in one generate(): padded on the right with the pad id
        and an attention mask (T5's encoder positions are relative, so right padding is exact)."""
        torch = self.torch
        pad = self.model.config.pad_token_id or 0
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor([int(i) for i in ids])
            mask[row, : len(ids)] = 1
        with torch.no_grad():
            out = self.model.generate(
                input_ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new,
            )
        return [strip(row[1:].tolist(), pad=pad) for row in out]

    def assisted(self, ids, max_new: int, k: int | None = None, schedule: str | None = None):
        """k/schedule None: transformers' own defaults. In 4.57 these must be set on the
        assistant's generation_config (generate() arguments are ignored)."""
        gc = self.assistant.generation_config
        keys = (
            "num_assistant_tokens",
            "num_assistant_tokens_schedule",
            "assistant_confidence_threshold",
        )
        saved = [getattr(gc, key) for key in keys]
        if k is not None:  # a fixed K: no confidence stop
            for key, value in zip(keys, (k, schedule or "constant", 0.0)):
                setattr(gc, key, value)
        try:
            with self.torch.no_grad():
                out = self.model.generate(
                    self.torch.tensor([ids]),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new,
                    assistant_model=self.assistant,
                )
        finally:
            for key, value in zip(keys, saved):
                setattr(gc, key, value)
        return strip(out[0, 1:].tolist())


class Optimum:
    """optimum's ORTModelForSeq2SeqLM on the same exported folders."""

    def __init__(self, main_onnx: Path, assistant_onnx: Path | None, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        self.torch = torch
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # The engine's pools: spinning during a run, stopped when it returns (a pool left
        # spinning slowed the next method: CTranslate2 93 vs 153 tokens/s after optimum).
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        self.model = ORTModelForSeq2SeqLM.from_pretrained(
            main_onnx, use_cache=True, session_options=so
        )
        self.assistant = None
        if assistant_onnx is not None:
            self.assistant = ORTModelForSeq2SeqLM.from_pretrained(
                assistant_onnx, use_cache=True, session_options=so
            )

    def greedy(self, ids, max_new: int, assistant: bool = False):
        kw = {"assistant_model": self.assistant} if assistant else {}
        out = self.model.generate(
            input_ids=self.torch.tensor([ids]),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new,
            **kw,
        )
        return strip(out[0, 1:].tolist())


def ct2_backend_env() -> str:
    """On AMD CPUs CTranslate2's MKL backend is ~2x slower (measured here: 84 vs 153 tokens/s
    float32); use its own backend there unless the user chose. Must run before the import."""
    if "CT2_USE_MKL" not in os.environ:
        try:
            with open("/proc/cpuinfo") as f:
                if "AMD" in f.read(4096):
                    os.environ["CT2_USE_MKL"] = "0"
        except OSError:
            pass
    return os.environ.get("CT2_USE_MKL", "default")


class CT2:
    """CTranslate2 Translator converted from the HF folder (float32 or int8)."""

    def __init__(self, main_dir: Path, threads: int, compute_type: str, workdir: Path):
        ct2_backend_env()
        import ctranslate2
        import sentencepiece as spm
        from ctranslate2.converters import TransformersConverter
        from transformers import T5Tokenizer

        out = workdir / f"ct2-{compute_type}"
        if out.exists() and not (out / "model.bin").is_file():  # not a conversion: not ours
            raise FileExistsError(f"{out} exists and holds no model.bin; move it away")
        if not out.exists():
            # converted in a temporary folder (removed after) and renamed when complete: an
            # interrupted conversion leaves no half model that a later run would take as done
            with tempfile.TemporaryDirectory(dir=workdir, prefix=".ct2-") as tmp:
                src, conv = Path(tmp) / "hf", Path(tmp) / "ct2"
                src.mkdir()
                for f in (CONFIG_FILE, "model.safetensors", GENERATION_CONFIG_FILE):
                    if (main_dir / f).exists():
                        os.symlink((main_dir / f).resolve(), src / f)
                # The converter reads the vocabulary from the tokenizer: build it without the
                # 100 sentinels the T5 tokenizer adds by default, or 8292 != 8192 pieces.
                T5Tokenizer(str(main_dir / SPIECE_FILE), extra_ids=0).save_pretrained(src)
                TransformersConverter(str(src)).convert(str(conv), quantization=compute_type)
                if not out.exists():  # else a concurrent run finished first: use its model
                    os.replace(conv, out)
        self.sp = spm.SentencePieceProcessor(model_file=str(main_dir / SPIECE_FILE))
        self.tr = ctranslate2.Translator(
            str(out),
            device="cpu",
            intra_threads=threads,
            inter_threads=1,
            compute_type=compute_type,
        )

    def greedy(self, ids, max_new: int):
        return self.greedy_batch([ids], max_new, 1)[0]

    def greedy_batch(self, batch, max_new: int, max_batch_size: int) -> list[list[int]]:
        """translate_batch on all of `batch`, at most max_batch_size examples per model call."""
        pieces = [[self.sp.id_to_piece(int(i)) for i in ids] for ids in batch]
        r = self.tr.translate_batch(
            pieces, max_batch_size=max_batch_size, beam_size=1, max_decoding_length=max_new
        )
        return [strip(self.sp.piece_to_id(p) for p in x.hypotheses[0]) for x in r]


def max_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on
    macOS)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if os.uname().sysname == "Darwin" else rss / 1024


def _ct2_serve(conn, main_dir: str, threads: int, compute_type: str, workdir: str) -> None:
    try:
        ct = CT2(Path(main_dir), threads, compute_type, Path(workdir))
    except Exception as exc:  # noqa: BLE001 - the parent records the peer as failed
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    # Requests: ("greedy", ids, max_new), ("batch", [ids, ...], max_new, max_batch_size) or
    # ("rss",); replies ("ok", value) or ("error", text); None stops the worker.
    ops = {"greedy": ct.greedy, "batch": ct.greedy_batch, "rss": max_rss_mb}
    try:
        while (msg := conn.recv()) is not None:
            try:
                conn.send(("ok", ops[msg[0]](*msg[1:])))
            except Exception as exc:  # noqa: BLE001 - the parent raises it as RuntimeError
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except EOFError:  # the parent exited
        pass


class CT2Worker:
    """CT2 in a process of its own: in one process, loading the int8 translator slows the
    float32 one from ~155 to ~85 tokens/s (measured here), so each compute type is isolated."""

    def __init__(self, main_dir: Path, threads: int, compute_type: str, workdir: Path):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, str(main_dir), threads, compute_type, str(workdir))
        self.proc = ctx.Process(target=_ct2_serve, args=args, daemon=True)
        self.proc.start()
        child.close()  # so a child that dies gives EOFError here instead of a hang
        try:
            status, err = self.conn.recv()
        except EOFError:
            status, err = "error", f"CTranslate2 worker exited with code {self.proc.exitcode}"
        if status != "ready":
            raise RuntimeError(err)

    def _ask(self, *msg):
        self.conn.send(msg)
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(
                f"CTranslate2 worker exited with code {self.proc.exitcode}"
            ) from None
        if status != "ok":
            raise RuntimeError(value)
        return value

    def greedy(self, ids, max_new: int) -> list[int]:
        return self._ask("greedy", [int(i) for i in ids], max_new)

    def greedy_batch(self, batch, max_new: int, max_batch_size: int) -> list[list[int]]:
        """translate_batch in the worker: the prompts of `batch`, max_batch_size per call."""
        return self._ask("batch", [[int(i) for i in ids] for ids in batch], max_new, max_batch_size)

    def max_rss_mb(self) -> float:
        """The worker's peak resident memory in MiB."""
        return self._ask("rss")

    def close(self) -> None:
        """Stop the worker (it also exits with this process: daemon)."""
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(5)
