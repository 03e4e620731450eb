"""One exported T5 folder on ONNX Runtime, and the per-generation decoder cache.

Shapes: B rows, T new decoder tokens, P past decoder length, S encoder length, M d_model,
H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import providers as prov
from . import verify as checked
from .errors import ModelFileError
from .stats import Counter
from .tokenizer import Tokenizer

ONNX_FILES = {
    "encoder": "encoder_model.onnx",
    "decoder": "decoder_model.onnx",
    "decoder_with_past": "decoder_with_past_model.onnx",
}
REQUIRED = ["config.json", "spiece.model", *ONNX_FILES.values()]
# Inputs the engine feeds each session (past_key_values.* besides) and outputs it reads first.
FEEDS = {
    "encoder": {"input_ids", "attention_mask"},
    "decoder": {"input_ids", "encoder_hidden_states", "encoder_attention_mask"},
    "decoder_with_past": {"input_ids", "encoder_attention_mask"},
}
OPTIONAL_FEEDS = {"decoder_with_past": {"encoder_hidden_states"}}
FIRST_OUTPUT = {"encoder": "last_hidden_state", "decoder": "logits", "decoder_with_past": "logits"}
# config.json keys the engine uses -> smallest valid value (ints; bools refused).
CONFIG_INTS = {
    "vocab_size": 1,
    "d_model": 1,
    "d_kv": 1,
    "num_heads": 1,
    "num_layers": 1,
    "pad_token_id": 0,
    "eos_token_id": 0,
}
CONFIG_OPTIONAL_INTS = {"decoder_start_token_id": 0, "num_decoder_layers": 1}


def _check_config(path: Path, c: dict) -> None:
    """Every key the engine reads is an int in range, so a damaged config fails here."""
    for key, low in {**CONFIG_INTS, **CONFIG_OPTIONAL_INTS}.items():
        if key not in CONFIG_INTS and c.get(key) is None:
            continue
        v = c.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            what = "missing" if key not in c else f"{v!r} is not an integer >= {low}"
            raise ModelFileError(f"{path}: {key} {what}")
    for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        if c.get(key) is not None and c[key] >= c["vocab_size"]:
            raise ModelFileError(f"{path}: {key} {c[key]} is not below vocab_size")


class T5Model:
    """Sessions, config and tokenizer of one exported folder (stairs-export or optimum layout)."""

    def __init__(
        self,
        folder: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        provider_options: dict | None = None,
        name: str | None = None,
        shared_thread_pool: bool = False,
        io_binding: bool = False,
        verify: bool = True,
        decoders: bool = True,
    ):
        """verify: check every file stairs.json lists against its sha256 (sizes are always
        checked); verify=False or STAIRS_VERIFY=0 skips the hashing for huge folders.
        decoders=False: load only the encoder of optimum's graphs (the batched path brings the
        masked decoder), so each decoder weight is resident once."""
        self.folder = Path(folder)
        self.name = name or self.folder.name
        self.threads = threads
        # Every file the engine (or ORT, for external data) opens must stay inside the folder;
        # checked first so that nothing is said about a file outside it, not even if it exists.
        data_files = [p.name for p in self.folder.glob("*.onnx_data")]
        for f in [*REQUIRED, "tokenizer_config.json", *data_files]:
            checked.inside(self.folder, f)
        missing = [f for f in REQUIRED if not (self.folder / f).is_file()]
        if missing:
            raise ModelFileError(
                f"{self.folder}: missing {', '.join(missing)} (export it with stairs-export)"
            )
        config_path = self.folder / "config.json"
        self.config = checked.read_json(config_path, dict)
        _check_config(config_path, self.config)
        self.manifest = self._read_manifest(checked.verify_enabled(verify))
        c = self.config
        self.vocab_size = c["vocab_size"]
        self.pad_id, self.eos_id = c["pad_token_id"], c["eos_token_id"]
        start = c.get("decoder_start_token_id")
        self.start_id = self.pad_id if start is None else start
        self.num_heads, self.d_kv = c["num_heads"], c["d_kv"]
        self.num_decoder_layers = c.get("num_decoder_layers") or c["num_layers"]
        self.tokenizer = Tokenizer(
            self.folder / "spiece.model",
            self.vocab_size,
            self.eos_id,
            self.pad_id,
            self.folder / "tokenizer_config.json",
        )
        explicit = provider.lower() != "auto"
        self.provider = prov.resolve(provider)
        so = prov.session_options(threads, shared_thread_pool)
        plist = prov.provider_list(self.provider, provider_options)
        # IO binding: inputs bound from numpy, outputs allocated by ORT on the provider's device.
        self.io_binding = io_binding
        self.device = {"cuda": "cuda"}.get(self.provider, "cpu")
        self.device_id = int((provider_options or {}).get("device_id", 0))
        self._session_args = (so, plist, explicit)
        roles = ONNX_FILES if decoders else {"encoder": ONNX_FILES["encoder"]}
        self.sessions = {role: self.open_session(fname) for role, fname in roles.items()}
        self._check_sessions()

    def open_session(self, fname: str) -> ort.InferenceSession:
        """An ORT session on a graph of this folder with this model's provider, threads and
        options; ModelFileError when it is missing, outside the folder or cannot load."""
        path = checked.inside(self.folder, fname)
        if not path.is_file():
            raise ModelFileError(f"{path}: missing (export the folder again with stairs-export)")
        so, plist, explicit = self._session_args
        try:
            sess = ort.InferenceSession(str(path), so, providers=plist)
        except Exception as exc:
            raise ModelFileError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
        prov.check_loaded(sess, f"{self.name}/{fname}", self.provider, str(path), explicit)
        return sess

    def _check_sessions(self) -> None:
        """Each session has the inputs the engine feeds and the outputs it reads, with the
        config's sizes where the graph fixes them: an unrelated ONNX model fails here."""
        for role, sess in self.sessions.items():
            path = self.folder / ONNX_FILES[role]
            ins = {i.name: i.shape for i in sess.get_inputs()}
            outs = [o.name for o in sess.get_outputs()]
            problems = []
            if FEEDS[role] - set(ins):
                problems.append(f"missing inputs {', '.join(sorted(FEEDS[role] - set(ins)))}")
            if not outs or outs[0] != FIRST_OUTPUT[role]:
                problems.append(f"missing first output {FIRST_OUTPUT[role]}")
            unknown = sorted(
                n
                for n in ins
                if n not in FEEDS[role] | OPTIONAL_FEEDS.get(role, set())
                and not (role == "decoder_with_past" and n.startswith("past_key_values."))
            )
            if unknown:
                problems.append(f"unexpected inputs {', '.join(unknown)}")
            if problems:
                raise ModelFileError(
                    f"{path}: not this engine's T5 {role.replace('_', ' ')}; " + "; ".join(problems)
                )
        if "decoder_with_past" in self.sessions:
            self._check_decoders()
        self._check_sizes()

    def _check_decoders(self) -> None:
        """Past/present names and order of optimum's two decoder graphs."""
        dwp = self.sessions["decoder_with_past"]
        self.past_names = [i.name for i in dwp.get_inputs() if i.name.startswith("past_key_values")]
        self.self_names = [n for n in self.past_names if ".decoder." in n]
        self.cross_names = [n for n in self.past_names if ".encoder." in n]
        self.step_needs_enc = "encoder_hidden_states" in {i.name for i in dwp.get_inputs()}
        dwp_path = self.folder / ONNX_FILES["decoder_with_past"]
        n = 2 * self.num_decoder_layers
        if len(self.self_names) != n or len(self.cross_names) != n:
            raise ModelFileError(
                f"{dwp_path}: {len(self.self_names)} self and {len(self.cross_names)} cross"
                f" past key/value inputs, config.json's {self.num_decoder_layers} decoder layers"
                f" need {n} each"
            )
        dec_path = self.folder / ONNX_FILES["decoder"]
        outs = [o.name for o in self.sessions["decoder"].get_outputs()]
        presents = [n.replace("past_key_values", "present") for n in self.past_names]
        lacking = [p for p in presents if p not in outs]
        if lacking:
            raise ModelFileError(
                f"{dec_path}: missing outputs {', '.join(lacking)} (another model's decoder?)"
            )
        self._first_self = [
            outs.index(n.replace("past_key_values", "present")) for n in self.self_names
        ]
        self._first_cross = [
            outs.index(n.replace("past_key_values", "present")) for n in self.cross_names
        ]
        step_outs = [o.name for o in dwp.get_outputs()]
        if step_outs[1:] != [n.replace("past_key_values", "present") for n in self.self_names]:
            raise ModelFileError(
                f"{dwp_path}: outputs after logits must be present.*.decoder.key/value"
                f" in layer order, found {', '.join(step_outs[1:]) or 'none'}"
            )

    def _check_sizes(self) -> None:
        """Sizes the graphs fix must be the config's (a symbolic dim is a str: not checked)."""
        c, enc, dec, step = self.config, *ONNX_FILES.values()
        want = {
            (enc, "last_hidden_state"): [(-1, c["d_model"])],
            (dec, "encoder_hidden_states"): [(-1, c["d_model"])],
            (dec, "logits"): [(-1, self.vocab_size)],
            (step, "logits"): [(-1, self.vocab_size)],
        }
        for name in getattr(self, "past_names", []):
            want[(step, name)] = [(1, self.num_heads), (-1, self.d_kv)]
        for role, sess in self.sessions.items():
            fname = ONNX_FILES[role]
            for arg in [*sess.get_inputs(), *sess.get_outputs()]:
                for axis, size in want.get((fname, arg.name), []):
                    dim = arg.shape[axis] if len(arg.shape) >= 2 else None
                    if isinstance(dim, int) and dim != size:
                        raise ModelFileError(
                            f"{self.folder / fname}: {arg.name} has size {dim} on axis {axis},"
                            f" config.json says {size}"
                        )

    def _read_manifest(self, hashes: bool = True) -> dict | None:
        """stairs.json if present, its listed files checked: inside the folder, present, the
        recorded size (so a truncated file fails here, clearly) and, if hashes, sha256."""
        return checked.verify_folder(self.folder, hashes)

    def _run(self, role: str, feed: dict, counter: Counter) -> list[np.ndarray]:
        t = time.perf_counter()
        sess = self.sessions[role]
        if self.io_binding:
            bind = sess.io_binding()
            for name, value in feed.items():
                bind.bind_cpu_input(name, np.ascontiguousarray(value))
            for o in sess.get_outputs():
                bind.bind_output(o.name, self.device, self.device_id)
            sess.run_with_iobinding(bind)
            out = bind.copy_outputs_to_cpu()
        else:
            out = sess.run(None, feed)
        counter.session_s += time.perf_counter() - t
        return out

    def encode(self, ids: np.ndarray, counter: Counter) -> tuple[np.ndarray, np.ndarray]:
        """Encoder: ids [1, S] -> hidden [1, S, M], mask [1, S]."""
        mask = np.ones_like(ids)
        return self._run("encoder", {"input_ids": ids, "attention_mask": mask}, counter)[0], mask


class Cache:
    """One model's decoder state for one generation; the only place key/values are rewound.

    `length` tokens of the decoder sequence are in the cache. feed() appends T tokens for B rows
    (rows share the past, broadcast); rewind() keeps one row and the first `length` positions.
    """

    def __init__(self, model: T5Model, enc: np.ndarray, mask: np.ndarray, counter: Counter):
        self.model, self.counter = model, counter
        self.enc, self.mask = enc, mask  # [1, S, M], [1, S]
        self.length = 0
        self.self_kv: list[np.ndarray] = []  # 2 per layer, [B, H, P, D]
        self._cross: dict[int, dict] = {}  # B -> feed entries of cross key/values and mask

    def _cross_feed(self, b: int) -> dict:
        # Encoder key/values never change during a generation: tile them once per row count.
        if b not in self._cross:
            one = self._cross[1]
            self._cross[b] = {
                k: np.ascontiguousarray(np.broadcast_to(v, (b,) + v.shape[1:]))
                for k, v in one.items()
            }
        return self._cross[b]

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Run the decoder on tokens [B, T] after the cached past; returns logits [B, T, V]."""
        m, b = self.model, tokens.shape[0]
        if self.length == 0:
            out = self.first(tokens)
            self._cross[1] = {n: out[i][:1] for n, i in zip(m.cross_names, m._first_cross)}
            self._cross[1]["encoder_attention_mask"] = self.mask
            if m.step_needs_enc:
                self._cross[1]["encoder_hidden_states"] = self.enc
            self.self_kv = [out[i] for i in m._first_self]
        else:
            feed = dict(self._cross_feed(b))
            feed["input_ids"] = tokens
            if b == 1:
                feed.update(zip(m.self_names, self.self_kv))
            else:
                feed.update(
                    (n, np.broadcast_to(a, (b,) + a.shape[1:]))
                    for n, a in zip(m.self_names, self.self_kv)
                )
            out = m._run("decoder_with_past", feed, self.counter)
            self.self_kv = out[1:]
        self.length += tokens.shape[1]
        return out[0]

    def first(self, tokens: np.ndarray) -> list[np.ndarray]:
        """decoder_model.onnx (no past) on tokens [B, T]; the cache itself is not touched."""
        b = tokens.shape[0]
        enc = self.enc if b == 1 else np.broadcast_to(self.enc, (b,) + self.enc.shape[1:])
        mask = self.mask if b == 1 else np.broadcast_to(self.mask, (b,) + self.mask.shape[1:])
        return self.model._run(
            "decoder",
            {"input_ids": tokens, "encoder_hidden_states": enc, "encoder_attention_mask": mask},
            self.counter,
        )

    def rewind(self, length: int, row: int = 0) -> None:
        """Keep row `row` and the first `length` cached positions (drop rejected drafts)."""
        if length > self.length:
            raise ValueError(f"cannot rewind forward ({self.length} -> {length})")
        if length == self.length and self.self_kv[0].shape[0] == 1:
            return
        self.self_kv = [a[row : row + 1, :, :length] for a in self.self_kv]
        self.length = length
