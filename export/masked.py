"""A T5 decoder graph with an explicit per-row self-attention mask and explicit positions, and a
small graph projecting the cross-attention key/values once per prompt.

`decoder_masked_model.onnx` writes the new tokens' key/values into their slots (`new_slots`) of
the one key/value buffer it is given, then attends from each new token to the slots its mask
allows, with T5's relative position bias from the positions fed, so one call carries ragged rows,
padding, rejected drafts left in the cache as masked holes, and tree branches at depth positions.
Every key sits at its slot's index in every reduction, so a row's logits are the same bits
whatever else shares the call. It returns the key/values of the new tokens only; the cache writes
them into its preallocated slots (nothing else is copied between calls). `cross_kv_model.onnx`
holds the cross-attention k/v projections, which the masked decoder does not: every decoder
weight is resident once across the two graphs.

Padding queries (a query whose mask row allows no slot at all) give finite, meaningless logits
and present key/values (uniform attention over the slots, as in HF, where every masked score gets
the same dtype-minimum added); mask their slots out in later calls and ignore their logits.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine import layout
from engine.layout import (
    ATTENTION_MASK,
    CROSS_FILE,
    DECODER_FILE,
    ENCODER_ATTENTION_MASK,
    ENCODER_FILE,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    NEW_SLOTS,
    PAST_POSITIONS,
    POSITIONS,
)

from . import stream
from .errors import CheckpointError, ConversionError, OptionError, ValidationError
from .graphs import DEFAULT_OPSET, check_opset, follow_umask, mark_query_rows, save_exported
from .memory import release


def _io_names(layers: int) -> dict:
    """Input/output names of both graphs for a decoder of `layers` layers (engine.layout's)."""
    return {
        "past": layout.past_names(layers),
        "present": layout.present_names(layers),
        "cross": layout.cross_names(layers),
        "full": layout.full_names(layers),
    }


def _bucket_table(attn):
    """Bucket of each distance 0..max_distance (query position - key position, clipped), from
    HF's own `_relative_position_bucket`: a lookup in the graph equals HF bit for bit (no Log and
    float-to-int cast that could round differently at a bucket edge). Decoder buckets are
    constant beyond max_distance and 0 for keys after the query."""
    import torch

    nb, md = attn.relative_attention_num_buckets, attn.relative_attention_max_distance
    dist = torch.arange(2 * md + 1, dtype=torch.long)
    table = attn._relative_position_bucket(
        -dist, bidirectional=False, num_buckets=nb, max_distance=md
    )
    if not bool((table[md:] == table[md]).all()):  # the clip below relies on it
        raise ConversionError(f"relative position buckets are not constant beyond {md}")
    return table[: md + 1].clone()


def _split(x, b, heads, d_kv):
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.view(b, -1, heads, d_kv).transpose(1, 2)


def _attend(q, k, v, bias, o, b, heads, d_kv):
    """One attention of the masked graphs: T5's (no 1/sqrt(d_kv) scaling), softmax in fp32 as
    HF. Each query is a product of its own ([B, H, T, 1, D] against [B, H, 1, S, D]), so a
    token's attention is the same bits however many tokens and rows share its call (S held in
    multiples of layout.ENC_CHUNK), and the keys and values are read as they lie (ORT packs a
    key matrix for each product of >= 2 rows). bias: [B, H or 1, T or 1, S]."""
    import torch

    scores = torch.matmul(q.unsqueeze(3), k.unsqueeze(2).transpose(4, 3)) + bias.unsqueeze(3)
    weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(weights, v.unsqueeze(2)).squeeze(3)
    return o(out.transpose(1, 2).reshape(b, -1, heads * d_kv))


def _embed(dec, tied: bool, input_ids, b, t):
    """The decoder's input embeddings [B, T, M] and, when tied, the transposed [M, V] weight the
    logits reuse (else None)."""
    import torch

    if tied:
        # One [M, V] weight serves both ends: the folded transpose feeds the logits'
        # MatMul and the embedding gathers its columns (else the file holds it twice).
        wt = dec.embed_tokens.weight.t()
        return torch.index_select(wt, 1, input_ids.reshape(-1)).t().reshape(b, t, -1), wt
    return dec.embed_tokens(input_ids), None


@functools.cache
def _scatter_nd():
    """f(data, indices, updates): data with updates [..., D] written at indices [..., 3], one
    ONNX ScatterND in the graph, its index built once per call (index_put would trace its own
    per layer). A factory: torch is imported only when a graph is traced."""
    import torch

    class ScatterND(torch.autograd.Function):
        @staticmethod
        def forward(ctx, data, indices, updates):
            return data.index_put(tuple(indices.unbind(-1)), updates)

        @staticmethod
        def symbolic(g, data, indices, updates):
            return g.op("ScatterND", data, indices, updates)

    return ScatterND.apply


def _biases(m, b, t, positions, past_positions, attention_mask, new_slots, enc_mask):
    """(self-attention bias [B, H, T, C] with the mask folded in, the (row, head, slot) of each
    new key/value [B, H, T, 3], cross-attention bias) of one call of m (the MaskedDecoder)."""
    import torch

    # Relative position bias from key position - query position (decoder: causal
    # buckets), the table of block 0 shared by every layer as in HF.
    # One buffer: the new tokens' keys go into their slots before attending, so every
    # key sits at its slot's index in every reduction, whatever else the call carries
    # (a concatenation would put a token at another index in each call shape).
    key_pos = past_positions.scatter(1, new_slots, positions)
    dist = (positions[:, :, None] - key_pos[:, None, :]).clamp(0, m.max_distance)
    table = m.dec.block[0].layer[0].SelfAttention.relative_attention_bias
    bias = table(m.buckets[dist]).permute(0, 3, 1, 2)  # [B, H, T, C]
    # (row, head, slot) of each new key/value: a ScatterND writes [D] slices, and leaves the
    # rest of a buffer bound as its own output untouched (a ScatterElements copies it whole)
    rows = torch.arange(b)[:, None, None].expand(b, m.heads, t)
    heads = torch.arange(m.heads)[None, :, None].expand(b, m.heads, t)
    slot_idx = torch.stack([rows, heads, new_slots[:, None, :].expand(b, m.heads, t)], -1)
    keep = attention_mask[:, None, :, :].to(torch.float32)
    self_bias = bias + (1.0 - keep) * m.min_value
    cross_bias = (1.0 - enc_mask[:, None, None, :].to(torch.float32)) * m.min_value
    return self_bias, slot_idx, cross_bias


def _masked_decoder(model):
    """The masked decoder as a torch module sharing the HF model's parameters. Its forward stays
    one piece: it is what torch.onnx traces, read top to bottom as the graph it becomes."""
    import torch
    from torch import nn

    cfg = model.config
    dec = model.decoder
    heads, d_kv = cfg.num_heads, cfg.d_kv
    layers = len(dec.block)

    class MaskedDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            # Registered, so their parameters export as initializers (not traced constants).
            self.dec, self.lm_head = dec, model.lm_head
            self.tied = model.lm_head.weight is dec.embed_tokens.weight
            self.register_buffer("buckets", _bucket_table(dec.block[0].layer[0].SelfAttention))
            self.max_distance = dec.block[0].layer[0].SelfAttention.relative_attention_max_distance
            self.heads, self.d_kv = heads, d_kv
            self.min_value = torch.finfo(torch.float32).min

        def forward(self, input_ids, positions, past_positions, attention_mask, new_slots, *rest):
            past, rest = rest[: 2 * layers], rest[2 * layers :]
            cross, enc_mask = rest[: 2 * layers], rest[2 * layers]
            dec = self.dec
            b, t = input_ids.shape
            h, wt = _embed(dec, self.tied, input_ids, b, t)
            self_bias, slot_idx, cross_bias = _biases(
                self, b, t, positions, past_positions, attention_mask, new_slots, enc_mask
            )
            presents, full = [], []
            for i, block in enumerate(dec.block):
                sa = block.layer[0]
                x = sa.layer_norm(h)
                k_new = _split(sa.SelfAttention.k(x), b, heads, d_kv)
                v_new = _split(sa.SelfAttention.v(x), b, heads, d_kv)
                presents += [k_new, v_new]
                k = _scatter_nd()(past[2 * i], slot_idx, k_new)
                v = _scatter_nd()(past[2 * i + 1], slot_idx, v_new)
                full += [k, v]
                q = _split(sa.SelfAttention.q(x), b, heads, d_kv)
                h = h + _attend(q, k, v, self_bias, sa.SelfAttention.o, b, heads, d_kv)
                ca = block.layer[1]
                q = _split(ca.EncDecAttention.q(ca.layer_norm(h)), b, heads, d_kv)
                k, v = cross[2 * i], cross[2 * i + 1]
                h = h + _attend(q, k, v, cross_bias, ca.EncDecAttention.o, b, heads, d_kv)
                h = block.layer[2](h)
            h = dec.final_layer_norm(h)
            if cfg.tie_word_embeddings:
                h = h * (cfg.d_model**-0.5)
            logits = torch.matmul(h, wt) if self.tied else self.lm_head(h)
            return (logits, *presents, *full)

    return MaskedDecoder()


def _cross_kv(model):
    """The cross key/value projector as a torch module sharing the HF model's parameters."""
    from torch import nn

    cfg = model.config

    class CrossKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = model.decoder

        def forward(self, encoder_hidden_states):
            b = encoder_hidden_states.shape[0]
            out = []
            for block in self.dec.block:
                att = block.layer[1].EncDecAttention
                out += [
                    _split(att.k(encoder_hidden_states), b, cfg.num_heads, cfg.d_kv),
                    _split(att.v(encoder_hidden_states), b, cfg.num_heads, cfg.d_kv),
                ]
            return tuple(out)

    return CrossKV()


def _modules(model):
    """Torch modules of the masked decoder and the cross key/value projector, sharing the HF
    model's parameters, and both graphs' input/output names."""
    names = _io_names(len(model.decoder.block))
    return _masked_decoder(model).eval(), _cross_kv(model).eval(), names


def _decoder_job(decoder, names: dict, cfg) -> tuple:
    """The masked decoder's export job (file, module, sample args, inputs, outputs, dynamic
    axes): 2 rows of 3 new tokens over 4 past slots, prompts of 5."""
    import torch

    b, t, p, s = 2, 3, 4, 5
    h, d = cfg.num_heads, cfg.d_kv
    rows = torch.arange(t)[None].expand(b, t)
    c = p + t  # capacity: the new tokens take slots p .. p+t-1 of the one buffer
    dec_args = (
        torch.ones(b, t, dtype=torch.long),
        rows + p,
        torch.arange(c)[None].expand(b, c).contiguous(),
        torch.ones(b, t, c, dtype=torch.long),
        (rows + p).contiguous(),
        *[torch.zeros(b, h, c, d) for _ in names["past"]],
        *[torch.zeros(b, h, s, d) for _ in names["cross"]],
        torch.ones(b, s, dtype=torch.long),
    )
    dec_in = [INPUT_IDS, POSITIONS, PAST_POSITIONS, ATTENTION_MASK, NEW_SLOTS]
    dec_in += names["past"] + names["cross"] + [ENCODER_ATTENTION_MASK]
    dec_out = [LOGITS] + names["present"] + names["full"]
    return (DECODER_FILE, decoder, dec_args, dec_in, dec_out, _decoder_axes(names))


def _decoder_axes(names: dict) -> dict:
    """The masked decoder's dynamic axes, by input/output name."""
    axes = {
        INPUT_IDS: {0: "batch", 1: "tokens"},
        POSITIONS: {0: "batch", 1: "tokens"},
        PAST_POSITIONS: {0: "batch", 1: "past"},
        ATTENTION_MASK: {0: "batch", 1: "tokens", 2: "past"},
        NEW_SLOTS: {0: "batch", 1: "tokens"},
        ENCODER_ATTENTION_MASK: {0: "batch", 1: "source"},
        LOGITS: {0: "batch", 1: "tokens"},
    }
    axes.update({n: {0: "batch", 2: "past"} for n in names["past"]})
    axes.update({n: {0: "batch", 2: "source"} for n in names["cross"]})
    axes.update({n: {0: "batch", 2: "tokens"} for n in names["present"]})
    axes.update({n: {0: "batch", 2: "past"} for n in names["full"]})
    return axes


def _cross_job(cross, names: dict, cfg) -> tuple:
    """The cross key/value graph's export job (as `_decoder_job`'s), prompts of 5."""
    import torch

    b, s = 2, 5
    return (
        CROSS_FILE,
        cross,
        (torch.zeros(b, s, cfg.d_model),),
        [ENCODER_HIDDEN_STATES],
        names["cross"],
        {ENCODER_HIDDEN_STATES: {0: "batch", 1: "source"}}
        | {n: {0: "batch", 2: "source"} for n in names["cross"]},
    )


def export_masked_decoder(
    model, out_dir: Path, opset: int | None = None, weights=None
) -> list[str]:
    """Export `decoder_masked_model.onnx` and `cross_kv_model.onnx` of a loaded
    `T5ForConditionalGeneration` (float32, eval) into out_dir; returns the file names written.
    Each file is written in a temporary folder inside out_dir and moved in when complete."""
    import torch

    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset, "opset")
    cfg = model.config
    if getattr(cfg, "model_type", None) not in ("t5", "mt5") or not hasattr(model, "lm_head"):
        raise CheckpointError("the masked decoder is exported from a T5ForConditionalGeneration")
    if model.dtype != torch.float32:
        raise OptionError(f"load the model in float32 to export it, not {model.dtype}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder, cross, names = _modules(model)
    jobs = [_decoder_job(decoder, names, cfg), _cross_job(cross, names, cfg)]
    written = _export_jobs(jobs, out_dir, opset, weights)
    mark_query_rows(out_dir / DECODER_FILE)
    return written


def check_in_place(path: Path) -> None:
    """The device cache binds each kv_cache.* output to its past input's memory: safe only if
    every node reading that input is an ancestor of the node writing the output (it has run
    by then). ConversionError if a rewrite (fp16, quantization, a new graph) broke that."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    # each whole-buffer output's past input (names for more layers than any graph has)
    most = len(graph.output)
    past_of = dict(zip(layout.full_names(most), layout.past_names(most)))
    for out in (o.name for o in graph.output if o.name in past_of):
        stack, before = [producer[out]], set()
        while stack:  # the ancestors of the writer, itself included
            node = stack.pop()
            if id(node) not in before:
                before.add(id(node))
                stack += [producer[i] for i in node.input if i in producer]
        past = past_of[out]
        late = [n.name or n.op_type for n in graph.node if past in n.input and id(n) not in before]
        if late:
            raise ConversionError(f"{path.name}: {late} read {past} after {out} is written")


def export_encoder(model, out_dir: Path, opset: int | None = None, weights=None) -> list[str]:
    """Export `encoder_model.onnx` (optimum's names: input_ids, attention_mask ->
    last_hidden_state) of a loaded float32 T5 into out_dir; returns the file names written."""
    import torch
    from torch import nn

    opset = DEFAULT_OPSET if opset is None else opset
    check_opset(opset, "opset")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = model.encoder

        def forward(self, input_ids, attention_mask):
            return self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    axes = {"batch": 0, "encoder_sequence_length": 1}
    dyn = {n: {v: k for k, v in axes.items()} for n in (INPUT_IDS, ATTENTION_MASK)}
    dyn[LAST_HIDDEN_STATE] = dict(dyn[INPUT_IDS])
    ids = torch.ones(2, 5, dtype=torch.long)
    job = (
        ENCODER_FILE,
        Encoder().eval(),
        (ids, torch.ones_like(ids)),
        [INPUT_IDS, ATTENTION_MASK],
        [LAST_HIDDEN_STATE],
        dyn,
    )
    return _export_jobs([job], out_dir, opset, weights)


def _export_jobs(jobs: list, out_dir: Path, opset: int, weights=None) -> list[str]:
    """torch.onnx.export each (file, module, args, inputs, outputs, dynamic axes) into a temporary
    folder inside out_dir, then move it in (`save_exported`); returns the file names written.
    weights (export.stream.Weights): the modules are hollow, traced without weights, and the
    weights are written from the checkpoint."""
    written = []
    for name, module, args, ins, outs, dyn in jobs:
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
        try:
            if weights is None:
                _trace(name, module, args, ins, outs, dyn, opset, tmp / name, True)
                written += save_exported(tmp, name, out_dir)
                continue
            with stream.recorded_initializers() as found:
                _trace(name, module, args, ins, outs, dyn, opset, tmp / name, False)
            (tmp / "full").mkdir()
            files = weights.write(tmp / name, found, tmp / "full" / name)
            for f in reversed(files):  # the data file first, so the graph never names a missing one
                follow_umask(tmp / "full" / f)
                os.replace(tmp / "full" / f, out_dir / f)
            written += files
        finally:  # Ctrl-C included: nothing half-written stays behind
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def _trace(name, module, args, ins, outs, dyn, opset: int, path: Path, params: bool) -> None:
    """torch.onnx.export of one module to path (with its weights or without)."""
    import torch

    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=ins,
                output_names=outs,
                dynamic_axes=dyn,
                opset_version=opset,
                dynamo=False,  # the TorchScript exporter takes dynamic_axes as named here
                do_constant_folding=True,
                export_params=params,
            )
    except OSError:  # the disk's (export.output.as_export_error words it)
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())
        raise ConversionError(
            f"torch.onnx.export of {name} failed: {type(exc).__name__}: {text}"
        ) from exc


# ---------------------------------------------------------------- validation against PyTorch


class _Graphs:
    """ONNX Runtime sessions of both graphs plus the helpers the validation cases share."""

    def __init__(self, out_dir: Path, layers: int, heads: int, d_kv: int):
        import onnxruntime as ort

        self.opts = ort.SessionOptions()
        self.opts.log_severity_level = 3
        # Prepacked weight copies would double a large decoder in RAM during validation.
        self.opts.add_session_config_entry("session.disable_prepacking", "1")
        self.out_dir = out_dir
        self._dec = None
        self.names = _io_names(layers)
        self.heads, self.d_kv = heads, d_kv

    @property
    def dec(self):
        """The decoder's session, opened on first use (after `cross_kv`'s is gone)."""
        import onnxruntime as ort

        if self._dec is None:
            path = str(self.out_dir / DECODER_FILE)
            self._dec = ort.InferenceSession(path, self.opts, providers=["CPUExecutionProvider"])
        return self._dec

    def cross_kv(self, enc: np.ndarray) -> dict:
        """The cross graph's key/values of enc; its session is gone before the decoder runs, so
        the two graphs' weights are never in memory together."""
        import onnxruntime as ort

        path = str(self.out_dir / CROSS_FILE)
        cross = ort.InferenceSession(path, self.opts, providers=["CPUExecutionProvider"])
        outs = cross.run(None, {ENCODER_HIDDEN_STATES: enc})
        del cross
        release()  # an inline graph's weights were read into the heap: give them back
        return dict(zip(self.names["cross"], outs))

    def empty_past(self, b: int) -> dict:
        z = np.zeros((b, self.heads, 0, self.d_kv), np.float32)
        return {n: z for n in self.names["past"]}

    def step(self, ids, pos, past_pos, mask, past: dict, cross: dict, enc_mask) -> tuple:
        """One call, the cases written as past slots then new tokens (mask [B, T, P+T]): the
        new tokens take slots P.. of a buffer of capacity P+T. Returns (logits, past extended
        by the new tokens' present key/values)."""
        ids, pos = np.asarray(ids, np.int64), np.asarray(pos, np.int64)
        b, t = ids.shape
        p = np.asarray(past_pos).reshape(b, -1).shape[1]
        room = np.zeros((b, self.heads, t, self.d_kv), np.float32)
        feed = {
            INPUT_IDS: ids,
            POSITIONS: pos,
            PAST_POSITIONS: np.concatenate([np.asarray(past_pos, np.int64).reshape(b, p), pos], 1),
            ATTENTION_MASK: np.asarray(mask, np.int64),
            NEW_SLOTS: np.tile(np.arange(p, p + t), (b, 1)),
            ENCODER_ATTENTION_MASK: enc_mask,
            **{k: np.concatenate([v, room], axis=2) for k, v in past.items()},
            **cross,
        }
        logits, *presents = self.dec.run([LOGITS, *self.names["present"]], feed)
        grown = {
            p: np.concatenate([past[p], new], axis=2)
            for p, new in zip(self.names["past"], presents)
        }
        return logits, grown


def _hf_logits(model, enc: np.ndarray, dec_ids: list[int]) -> np.ndarray:
    """HF's own logits for one decoder sequence (no cache, no padding) on one prompt's encoder
    states enc ([1, S, D], from `_encode_alone`): what model(input_ids=prompt, ...) computes,
    without running the encoder again. [T, V]."""
    import torch

    with torch.no_grad():
        out = model(
            encoder_outputs=(torch.from_numpy(enc),),
            decoder_input_ids=torch.tensor([dec_ids]),
            use_cache=False,
        )
    return out.logits[0].numpy()


def _encode_alone(model, prompt: list[int]) -> np.ndarray:
    """The encoder states of one prompt run alone (no mask, no padding), as HF's model() runs
    its encoder when given input_ids."""
    import torch

    with torch.no_grad():
        return model.encoder(input_ids=torch.tensor([prompt])).last_hidden_state.numpy()


def _encode_prompts(model, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(encoder states, encoder mask) of the prompts, right-padded into one batch."""
    import torch

    s = max(len(p) for p in prompts)
    enc_ids = np.zeros((3, s), np.int64)
    enc_mask = np.zeros((3, s), np.int64)
    for r, p in enumerate(prompts):
        enc_ids[r, : len(p)], enc_mask[r, : len(p)] = p, 1
    with torch.no_grad():
        enc = model.encoder(
            input_ids=torch.from_numpy(enc_ids), attention_mask=torch.from_numpy(enc_mask)
        ).last_hidden_state.numpy()
    return enc, enc_mask


def _hf_cross(model, prompts: list[list[int]], enc: np.ndarray) -> list[dict]:
    """Per prompt: HF's cross key/value projections of its (unpadded) encoder states."""
    import torch

    cfg = model.config
    lins = [(a.k, a.v) for a in (block.layer[1].EncDecAttention for block in model.decoder.block)]
    names = layout.cross_names(len(lins))  # each layer's key, then value
    cross = []
    with torch.no_grad():
        for r, p in enumerate(prompts):
            h = torch.from_numpy(enc[r : r + 1, : len(p)])
            want = [
                lin(h).view(1, -1, cfg.num_heads, cfg.d_kv).transpose(1, 2).numpy()
                for pair in lins
                for lin in pair
            ]
            cross.append(dict(zip(names, want)))
    return cross


def _reference_cases(hf, toks, start: int) -> dict:
    """Decoder tokens and HF's logits of cases d, a, b, c (see `check_masked_decoder`); hf(r,
    seq) gives prompt r's logits, toks(n) n random tokens (drawn in this order)."""
    ref: dict = {}
    # (d) P = 0, several tokens per row.
    d = [[start] + toks(4) for _ in range(3)]
    ref["d"] = {"seqs": d, "logits": [hf(r, d[r]) for r in range(3)]}
    # (a) ragged rows: past lengths 5, 2, 3, then 1, 4, 2 new tokens, then one more each.
    past_len, new_len = [5, 2, 3], [1, 4, 2]
    a = [[start] + toks(p - 1 + n + 1) for p, n in zip(past_len, new_len)]
    ref["a"] = {
        "past_len": past_len,
        "new_len": new_len,
        "seqs": a,
        "past": [hf(r, a[r][:p]) for r, p in enumerate(past_len)],
        "new": [hf(r, a[r][: p + n])[p:] for r, (p, n) in enumerate(zip(past_len, new_len))],
        "last": [hf(r, a[r])[-1] for r in range(3)],
    }
    # (b) holes: a prefix of 4, 4 drafts of which 1 is kept, then 3 more tokens.
    prefix, drafts, tail = [start] + toks(3), toks(4), toks(3)
    ref["b"] = {
        "prefix": prefix,
        "drafts": drafts,
        "tail": tail,
        "logits": hf(0, prefix + drafts[:1] + tail),  # what HF sees: the compacted sequence
    }
    # (c) two tree branches after a shared 3-token prefix, then one more token on branch B.
    prefix, br_a, br_b = [start] + toks(2), toks(2), toks(3)
    nxt = toks(1)
    ref["c"] = {
        "prefix": prefix,
        "a": br_a,
        "b": br_b,
        "next": nxt,
        "logits_a": hf(0, prefix + br_a),
        "logits_b": hf(0, prefix + br_b + nxt),
    }
    return ref


def masked_reference(model) -> dict:
    """PyTorch numbers `check_masked_decoder` compares both graphs with: random prompts and
    decoder tokens for every case, the encoder states, HF's cross key/values and HF's own
    logits. Computed while the model is loaded, so it can be freed before ONNX Runtime loads
    the files (as export.validate.torch_reference)."""
    cfg = model.config
    rng = np.random.default_rng(0)
    vocab, start = cfg.vocab_size, cfg.decoder_start_token_id

    def toks(n):
        return [int(x) for x in rng.integers(3, vocab, n)]

    # Three prompts of different lengths, right-padded: the encoder mask is exercised too.
    prompts = [toks(n) + [cfg.eos_token_id] for n in (11, 7, 4)]
    enc, enc_mask = _encode_prompts(model, prompts)
    cross = _hf_cross(model, prompts, enc)

    alone = [_encode_alone(model, p) for p in prompts]

    def hf(r: int, seq: list[int]) -> np.ndarray:
        return _hf_logits(model, alone[r], seq)

    ref: dict = {
        "layers": len(model.decoder.block),
        "heads": cfg.num_heads,
        "d_kv": cfg.d_kv,
        "prompts": prompts,
        "enc": enc,
        "enc_mask": enc_mask,
        "cross": cross,
    }
    return ref | _reference_cases(hf, toks, start)


class _Checker:
    """Compares graph outputs with the reference, recording the max abs difference per case."""

    def __init__(self, tol: float | None):
        self.tol = tol
        self.report: dict = {}

    def __call__(self, case: str, got: np.ndarray, want: np.ndarray, file: str = DECODER_FILE):
        diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
        bound = np.inf if self.tol is None else self.tol * max(1.0, float(np.max(np.abs(want))))
        self.report[case] = max(self.report.get(case, 0.0), diff)
        if not np.isfinite(diff) or diff > bound:
            raise ValidationError(file, case, diff, bound)


def _causal(n: int) -> np.ndarray:
    """[n, n] lower-triangular ones: each new token sees itself and those before it."""
    return np.tril(np.ones((n, n), np.int64))


def _check_first_step(g: _Graphs, ref: dict, check: _Checker, cr: dict, em) -> None:
    """(d) P = 0, several tokens per row, causal."""
    seqs = ref["d"]["seqs"]
    logits, _ = g.step(
        seqs, [list(range(5))] * 3, np.zeros((3, 0)), [_causal(5)] * 3, g.empty_past(3), cr, em
    )
    for r in range(3):
        check("d: first step, no past", logits[r], ref["d"]["logits"][r])


def _check_ragged(g: _Graphs, ra: dict, check: _Checker, cr: dict, em) -> None:
    """(a) ragged rows: past lengths 5, 2, 3 left-padded in the cache; then 1, 4, 2 new tokens
    right-padded; then one more token per row over the right-padding holes."""
    past_len, new_len, seqs = ra["past_len"], ra["new_len"], ra["seqs"]
    pmax, nmax = max(past_len), max(new_len)
    ids = np.zeros((3, pmax), np.int64)
    pos = np.zeros((3, pmax), np.int64)
    mask = np.zeros((3, pmax, pmax), np.int64)
    for r, p in enumerate(past_len):
        ids[r, pmax - p :] = seqs[r][:p]
        pos[r, pmax - p :] = np.arange(p)
        mask[r, pmax - p :, pmax - p :] = _causal(p)
    # Padding query rows attend to nothing here: their outputs must stay finite.
    logits, past = g.step(ids, pos, np.zeros((3, 0)), mask, g.empty_past(3), cr, em)
    if not np.isfinite(logits).all():
        raise ValidationError(DECODER_FILE, "a: padding rows give non-finite logits", np.inf, 0)
    for r, p in enumerate(past_len):
        check("a: ragged rows", logits[r, pmax - p :], ra["past"][r])
    kept = mask[:, -1, :].copy()  # cache slots holding real tokens (the last query sees them all)
    kept[:, -1] = 1
    past_pos = pos
    ids = np.zeros((3, nmax), np.int64)
    pos = np.zeros((3, nmax), np.int64)
    mask = np.zeros((3, nmax, pmax + nmax), np.int64)
    for r, (p, n) in enumerate(zip(past_len, new_len)):
        ids[r, :n] = seqs[r][p : p + n]
        pos[r, :n] = np.arange(p, p + n)
        mask[r, :n, :pmax] = kept[r]
        mask[r, :n, pmax : pmax + n] = _causal(n)
    logits, past = g.step(ids, pos, past_pos, mask, past, cr, em)
    for r, n in enumerate(new_len):
        check("a: ragged rows", logits[r, :n], ra["new"][r])
    kept = np.concatenate([kept, (np.arange(nmax)[None] < np.array(new_len)[:, None])], axis=1)
    past_pos = np.concatenate([past_pos, pos], axis=1)
    last = [[seqs[r][p + n]] for r, (p, n) in enumerate(zip(past_len, new_len))]
    mask = np.concatenate([kept, np.ones((3, 1), np.int64)], axis=1)[:, None, :]
    pos = [[p + n] for p, n in zip(past_len, new_len)]
    logits, _ = g.step(last, pos, past_pos, mask, past, cr, em)
    for r in range(3):
        check("a: ragged rows", logits[r, 0], ra["last"][r])


def _check_holes(g: _Graphs, rb: dict, check: _Checker, cr: dict, em) -> None:
    """(b) holes: prefix of 4; 4 drafts of which 1 is kept, 3 rejected and left in the cache as
    masked slots (positions arbitrary); then 2 tokens at positions 5, 6; then 1 at 7."""
    causal = _causal(5)
    prefix, drafts, tail = rb["prefix"], rb["drafts"], rb["tail"]
    _, past = g.step(
        [prefix], [list(range(4))], np.zeros((1, 0)), causal[None, :4, :4], g.empty_past(1), cr, em
    )
    draft_mask = np.concatenate([np.ones((4, 4), np.int64), causal[:4, :4]], axis=1)
    _, past = g.step([drafts], [[4, 5, 6, 7]], [[0, 1, 2, 3]], draft_mask[None], past, cr, em)
    slots = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    past_pos = [[0, 1, 2, 3, 4, 99, -7, 6]]  # hole positions: anything
    mask = np.concatenate([np.tile(slots, (2, 1)), causal[:2, :2]], axis=1)
    logits, past = g.step([tail[:2]], [[5, 6]], past_pos, mask[None], past, cr, em)
    check("b: masked holes", logits[0], rb["logits"][5:7])
    mask = np.concatenate([slots, [1, 1, 1]])[None, None]
    logits, _ = g.step([tail[2:]], [[7]], [past_pos[0] + [5, 6]], mask, past, cr, em)
    check("b: masked holes", logits[0], rb["logits"][7:8])


def _check_tree(g: _Graphs, rc: dict, check: _Checker, cr: dict, em) -> None:
    """(c) one row, two tree branches after a shared 3-token prefix: A = 2 tokens, B = 3 tokens,
    laid out [a1 a2 b1 b2 b3] at depth positions [3 4 3 4 5]; then branch B accepted and one
    more token at position 6 with A's slots masked."""
    prefix, br_a, br_b, nxt = rc["prefix"], rc["a"], rc["b"], rc["next"]
    _, past = g.step(
        [prefix], [[0, 1, 2]], np.zeros((1, 0)), _causal(3)[None], g.empty_past(1), cr, em
    )
    tree = np.zeros((5, 8), np.int64)
    tree[:, :3] = 1
    tree[0, 3] = tree[1, 3:5] = 1  # a1; a1 a2
    tree[2, 5] = 1  # b1
    tree[3, 5:7] = 1  # b1 b2
    tree[4, 5:8] = 1  # b1 b2 b3
    logits, past = g.step([br_a + br_b], [[3, 4, 3, 4, 5]], [[0, 1, 2]], tree[None], past, cr, em)
    check("c: tree branches", logits[0, :2], rc["logits_a"][3:])
    check("c: tree branches", logits[0, 2:], rc["logits_b"][3:6])
    mask = np.array([[[1, 1, 1, 0, 0, 1, 1, 1, 1]]], np.int64)
    logits, _ = g.step([nxt], [[6]], [[0, 1, 2, 3, 4, 3, 4, 5]], mask, past, cr, em)
    check("c: tree branches", logits[0], rc["logits_b"][6:7])


def check_masked_decoder(ref: dict, out_dir: Path, tol: float | None = 1e-4) -> dict:
    """Run both graphs in out_dir on the cases of `ref` (from `masked_reference`): ragged rows,
    masked holes, a tree row and a first step with no past; every cache is built from the
    graph's own present outputs. tol is relative to max(1, max |reference|), like the other
    files' validation; None only records the differences (non-finite outputs still raise).
    Returns the max abs difference per case; raises ValidationError naming the file and case."""
    out_dir = Path(out_dir)
    g = _Graphs(out_dir, ref["layers"], ref["heads"], ref["d_kv"])
    check = _Checker(tol)
    prompts, enc_mask = ref["prompts"], ref["enc_mask"]
    cross = g.cross_kv(ref["enc"])
    for r, p in enumerate(prompts):
        for name, want in ref["cross"][r].items():
            check("cross_kv", cross[name][r : r + 1, :, : len(p)], want, CROSS_FILE)

    def rows_of(rows: list[int]):
        return {k: v[rows] for k, v in cross.items()}, enc_mask[rows]

    _check_first_step(g, ref, check, *rows_of([0, 1, 2]))
    _check_ragged(g, ref["a"], check, *rows_of([0, 1, 2]))
    _check_holes(g, ref["b"], check, *rows_of([0]))
    _check_tree(g, ref["c"], check, *rows_of([0]))
    return check.report


def validate_masked_decoder(model, out_dir: Path, tol: float | None = 1e-4) -> dict:
    """Compare both graphs in out_dir with HF's own model (`masked_reference` then
    `check_masked_decoder`). Returns the max abs difference per case; raises ValidationError
    naming the file and case."""
    return check_masked_decoder(masked_reference(model), out_dir, tol)
