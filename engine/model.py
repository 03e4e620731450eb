"""One exported T5 folder on ONNX Runtime: the encoder, the masked decoder and the cross
key/value graph, each loaded once. The decoder is called only by engine.cache.BatchCache.

Shapes: B rows, S encoder length, M d_model, H heads, D d_kv, V vocab.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import layout as lay
from . import providers as prov
from . import verify as checked
from . import weights
from .errors import InputError, ModelFileError
from .layout import CROSS_FILE, ENCODER_FILE, EXPORT_ID_KEY
from .options import KV_CACHES
from .stats import Counter
from .tokenizer import Tokenizer
from .weights import WeightsCache

log = logging.getLogger("stairs")
MASKED_FILE = lay.DECODER_FILE
OPTIMUM_FILE = lay.OPTIMUM_PAST_FILE  # optimum's layout: no masked graph, refused
REQUIRED = [lay.CONFIG_FILE, lay.SPIECE_FILE, *lay.GRAPH_FILES]
GRAPHS = {"encoder": ENCODER_FILE, "decoder": MASKED_FILE, "cross": CROSS_FILE}
STEP_FEEDS = (
    lay.INPUT_IDS,
    lay.POSITIONS,
    lay.PAST_POSITIONS,
    lay.ATTENTION_MASK,
    lay.ENCODER_ATTENTION_MASK,
)
# The fewest tokens a call carries (and encoder positions): ORT's kernels take another path for
# a single row, so a one-token call would give other bits than the same row in a wider call.
# Graphs whose attention is one product per query (stairs.attention_query_rows = 1) or adds a
# query row of its own (= 2) need it for the call as a whole (its linear layers); older ones for
# every row (their attention).
MIN_TOKENS = 2
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


def check_folder(folder: Path) -> None:
    """The folder exists, is a folder and has every file the engine loads; one line if not."""
    if not folder.exists():
        raise ModelFileError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: not a folder (give the exported model's folder)")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if missing and MASKED_FILE in missing and (folder / OPTIMUM_FILE).is_file():
        raise ModelFileError(
            f"{folder}: an optimum export without stairs' masked decoder graph; make a full"
            f" folder with: stairs-export SOURCE_CHECKPOINT -o {folder}"
        )
    if missing:
        raise ModelFileError(
            f"{folder}: missing {', '.join(missing)} (export it with stairs-export)"
        )


def _check_format(folder: Path, manifest: dict | None) -> None:
    """ModelFileError for a folder a newer stairs-export wrote (its graphs may need what this
    engine does not do to stay exact); older formats load."""
    version = (manifest or {}).get("format_version", lay.FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{folder / lay.MANIFEST}: format_version {version!r} is not a number")
    if version > lay.FORMAT_VERSION:
        raise ModelFileError(
            f"{folder}: folder format {version}, written by a newer stairs-export; this engine"
            f" reads formats up to {lay.FORMAT_VERSION}: upgrade stairs"
        )


class T5Model:
    """Sessions, config and tokenizer of one exported folder: encoder, masked decoder and
    cross key/value graph (optimum's decoder files, if present, are not loaded)."""

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
        weights_cache: WeightsCache | None = None,
        kv_cache: str = "auto",
    ):
        """verify: check every file stairs.json lists against its sha256 (sizes are always
        checked); verify=False or STAIRS_VERIFY=0 skips the hashing for huge folders.
        weights_cache: map each graph's prepacked form from there (engine.weights), and hash
        only files changed since their hash was remembered; None: plain sessions.
        kv_cache: where the decoder key/values live: numpy (host arrays), device (OrtValues on
        the provider's device, engine.device_cache; needs a graph with kv_cache outputs) or
        auto (device on CUDA when the graph allows it, else numpy)."""
        self.folder = Path(folder)
        self.name = name or self.folder.name
        self.threads = threads
        self._check_paths()
        config_path = self.folder / lay.CONFIG_FILE
        self.config = checked.read_json(config_path, dict)
        _check_config(config_path, self.config)
        self.weights_cache = weights_cache
        hasher = weights_cache.sha256 if weights_cache else None
        self.verified = checked.verify_enabled(verify)
        self.manifest = checked.verify_folder(self.folder, self.verified, hasher)
        _check_format(self.folder, self.manifest)
        self._read_dimensions(self.config)
        self.tokenizer = Tokenizer(
            self.folder / lay.SPIECE_FILE,
            self.vocab_size,
            self.eos_id,
            self.pad_id,
            self.folder / lay.TOKENIZER_CONFIG_FILE,
        )
        explicit = provider.lower() != "auto"
        self.provider = prov.resolve(provider)
        plist = prov.provider_list(self.provider, provider_options)
        # IO binding: inputs bound from numpy, outputs allocated by ORT on the provider's device.
        self.io_binding = io_binding
        self.device = {"cuda": "cuda"}.get(self.provider, "cpu")
        self.device_id = int((provider_options or {}).get("device_id", 0))
        make_options = functools.partial(prov.session_options, threads, shared_thread_pool)
        self._session_args = (make_options, plist, explicit)
        self.self_names = lay.past_names(self.num_decoder_layers)
        self.cross_names = lay.cross_names(self.num_decoder_layers)
        self.cache_entries: dict[str, str | None] = {}  # graph file -> its mapped cache entry
        self.sessions = self._open_sessions()
        self._check_encoder()
        self._check_decoder()
        self._check_export_ids()
        self.kv_cache = self._pick_kv_cache(kv_cache)
        self.kvops = None  # engine.device_cache.KVOps, opened by the first device cache

    def _check_paths(self) -> None:
        """Every file the engine (or ORT, for external data) opens stays inside the folder
        (checked first, so nothing is said about a file outside it, not even if it exists),
        and the folder has them all."""
        if self.folder.is_dir():
            data_files = [p.name for p in self.folder.glob("*.onnx_data")]
            for f in [*REQUIRED, lay.TOKENIZER_CONFIG_FILE, *data_files]:
                checked.inside(self.folder, f)
        check_folder(self.folder)

    def _pick_kv_cache(self, want: str) -> str:
        """numpy or device, from kv_cache's value and what the graph and provider allow."""
        if want not in KV_CACHES:
            raise InputError(f"kv_cache must be one of {', '.join(KV_CACHES)}, not {want!r}")
        if want == "device" and not self.has_full:
            raise ModelFileError(
                f"{self.folder / MASKED_FILE}: exported before the device cache (no kv_cache"
                " outputs); export it again with stairs-export, or use kv_cache='numpy'"
            )
        if want == "auto":
            return "device" if self.provider == "cuda" and self.has_full else "numpy"
        return want

    def _read_dimensions(self, c: dict) -> None:
        """Special ids and sizes from a checked config.json."""
        self.vocab_size = c["vocab_size"]
        self.pad_id, self.eos_id = c["pad_token_id"], c["eos_token_id"]
        start = c.get("decoder_start_token_id")
        self.start_id = self.pad_id if start is None else start
        self.num_heads, self.d_kv = c["num_heads"], c["d_kv"]
        self.num_decoder_layers = c.get("num_decoder_layers") or c["num_layers"]

    def _open_sessions(self) -> dict[str, ort.InferenceSession]:
        """Encoder, masked decoder and cross graph: mapped from the weights cache when their
        entries are complete, else opened (and cached) one by one."""
        mapped = self._open_mapped(GRAPHS)
        return {r: mapped.get(r) or self.open_session(f) for r, f in GRAPHS.items()}

    def _open_mapped(self, graphs: dict[str, str]) -> dict:
        """The graphs whose prepacked entries are complete, opened at once in threads: opening
        one is mostly page faults on its mapped weights (t5-large shape: 1.7-2.5 s one after
        the other, 1.0-1.2 s together). Missing or stale ones are left to open_session."""
        if self.weights_cache is None or self.provider != "cpu":
            return {}
        make_options, plist, explicit = self._session_args
        make_options()  # the process-wide pool, if asked for, is set up here, not in a race

        def one(fname: str):
            path = checked.inside(self.folder, fname)
            hasher = self.weights_cache.sha256
            try:
                sha = weights.sources(self.folder, fname, self.manifest, hasher, self.verified)
            except ModelFileError:
                return None
            sess = self.weights_cache.mapped(path, sha, self.provider, make_options, plist)
            if sess is not None:
                prov.check_loaded(sess, f"{self.name}/{fname}", self.provider, str(path), explicit)
                self.cache_entries[fname] = str(self.weights_cache.entry(path, sha, self.provider))
            return sess

        with ThreadPoolExecutor(len(graphs)) as pool:
            return dict(zip(graphs, pool.map(one, graphs.values()), strict=True))

    def open_session(self, fname: str) -> ort.InferenceSession:
        """An ORT session on a graph of this folder with this model's provider, threads and
        options; ModelFileError when it is missing, outside the folder or cannot load."""
        path = checked.inside(self.folder, fname)
        if not path.is_file():
            raise ModelFileError(f"{path}: missing (export the folder again with stairs-export)")
        make_options, plist, explicit = self._session_args
        try:
            sess = entry = None
            if self.weights_cache is not None:
                hasher = self.weights_cache.sha256
                sha = weights.sources(self.folder, fname, self.manifest, hasher, self.verified)
                sess = self.weights_cache.session(path, sha, self.provider, make_options, plist)
                if sess is not None:
                    entry = str(self.weights_cache.entry(path, sha, self.provider))
            if sess is None:
                sess = ort.InferenceSession(str(path), make_options(), providers=plist)
        except ModelFileError:
            raise
        except Exception as exc:
            raise ModelFileError(f"{path}: cannot load ({type(exc).__name__}: {exc})") from exc
        prov.check_loaded(sess, f"{self.name}/{fname}", self.provider, str(path), explicit)
        self.cache_entries[fname] = entry
        return sess

    def _check_encoder(self) -> None:
        """The encoder takes input_ids and attention_mask and gives [B, S, d_model]: an
        unrelated ONNX model fails here."""
        sess, path = self.sessions["encoder"], self.folder / ENCODER_FILE
        ins = {i.name for i in sess.get_inputs()}
        outs = sess.get_outputs()
        problems = []
        want = (lay.INPUT_IDS, lay.ATTENTION_MASK)
        if ins != set(want):
            problems.append(f"inputs {', '.join(sorted(ins))} (want {', '.join(want)})")
        if not outs or outs[0].name != lay.LAST_HIDDEN_STATE:
            problems.append(f"missing first output {lay.LAST_HIDDEN_STATE}")
        elif isinstance(dim := outs[0].shape[-1], int) and dim != self.config["d_model"]:
            problems.append(f"{lay.LAST_HIDDEN_STATE} has size {dim}, {lay.CONFIG_FILE} says"
                            f" d_model {self.config['d_model']}")  # fmt: skip
        if problems:
            raise ModelFileError(f"{path}: not this engine's T5 encoder; " + "; ".join(problems))

    def _check_decoder(self) -> None:
        """The masked decoder and cross graphs have this engine's inputs and outputs for the
        config's layers, heads and vocabulary."""
        dec, path = self.sessions["decoder"], self.folder / MASKED_FILE
        ins = {i.name: i for i in dec.get_inputs()}
        outs = [o.name for o in dec.get_outputs()]
        want_out = [lay.LOGITS, *lay.present_names(self.num_decoder_layers)]
        # graphs with the device cache also output each whole buffer after the new tokens'
        # writes (kv_cache.*): bound to the past inputs, the graph updates the cache in place
        self.full_names = lay.full_names(self.num_decoder_layers)
        self.output_names = {"decoder": want_out}
        # in place: the new tokens' key/values go into their slots of one buffer in the graph;
        # older folders concatenate them
        self.in_place = lay.NEW_SLOTS in ins
        # graphs whose attention is safe per query need a pad only when a call has a single
        # token in all (then the linear layers would run one row); older ones every row
        rows = dec.get_modelmeta().custom_metadata_map.get(lay.QUERY_ROWS_KEY)
        self.min_tokens = 1 if rows in ("1", "2") else MIN_TOKENS
        if rows == "2":
            log.warning(
                "%s: exported before format 3 (attention one product per query, slice writes);"
                " it runs exactly but 1.1-1.6x slower per call: export it again with stairs-export",
                path,
            )
        if not self.in_place:
            log.warning(
                "%s: exported before the decoder wrote into its slots; it runs, but its outputs"
                " are not bit-identical by construction: export it again with stairs-export",
                path,
            )
        feeds = {*STEP_FEEDS, *self.self_names, *self.cross_names}
        feeds |= {lay.NEW_SLOTS} if self.in_place else set()
        self.has_full = outs == want_out + self.full_names
        if set(ins) != feeds or outs not in (want_out, want_out + self.full_names):
            raise ModelFileError(
                f"{path}: not this engine's masked decoder for {self.num_decoder_layers} layers"
                " (inputs or outputs differ)"
            )
        # a named (free) vocab dimension passes here; ORT then checks each call's logits
        # against the host array engine.cache sizes by vocab_size
        vocab = dec.get_outputs()[0].shape[-1]
        heads = ins[self.self_names[0]].shape[1]
        for what, got, want in ((lay.LOGITS, vocab, self.vocab_size), ("heads", heads,
                                self.num_heads)):  # fmt: skip
            if isinstance(got, int) and got != want:
                raise ModelFileError(f"{path}: {what} {got}, {lay.CONFIG_FILE} says {want}")
        self._check_cross()
        self.mask_dtype = {"tensor(bool)": np.bool_, "tensor(float)": np.float32}.get(
            ins[lay.ATTENTION_MASK].type, np.int64
        )

    def _check_cross(self) -> None:
        """The cross graph takes the encoder's states and gives every layer's key/values."""
        cross = self.sessions["cross"]
        ins = [i.name for i in cross.get_inputs()]
        if (
            ins != [lay.ENCODER_HIDDEN_STATES]
            or [o.name for o in cross.get_outputs()] != self.cross_names
        ):
            raise ModelFileError(
                f"{self.folder / CROSS_FILE}: not this engine's cross key/value graph for"
                f" {self.num_decoder_layers} layers"
            )

    def _check_export_ids(self) -> None:
        """Every graph (and stairs.json) names the same export: a graph copied in from another
        export (an int4 decoder into an fp32 folder) is refused, naming each file's id. A
        folder exported before ids (none anywhere) loads."""
        ids = {
            f: self.sessions[r].get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
            for r, f in GRAPHS.items()
        }
        if self.manifest is not None:
            listed = self.manifest.get(lay.MANIFEST_EXPORT_ID)
            ids[lay.MANIFEST] = None if listed is None else str(listed)
        if len(set(ids.values())) > 1:
            named = ", ".join(f"{f} {i or '(none)'}" for f, i in ids.items())
            raise ModelFileError(
                f"{self.folder}: files of different exports mixed (export ids: {named});"
                " export the folder again with stairs-export"
            )

    def run(
        self, role: str, feed: dict, counter: Counter, outputs: dict | None = None, binding=None
    ) -> list:
        """The one call site of a graph (encoder, decoder or cross); counts its seconds.

        feed values: numpy arrays, OrtValues, or a buffer bound by address (engine.device_cache
        Slab: rows of a device buffer; engine.cache._Host: rows of a host array). outputs (IO
        binding): name -> such a buffer to write into, or None to leave it on the device;
        returns the bound outputs' OrtValues (none when every output went into a buffer).
        binding: an IO binding of this graph to bind into and run (what it already holds stays
        bound). Without outputs: numpy arrays of the graph's outputs (the decoder's logits and
        new key/values)."""
        t = time.perf_counter()
        sess = self.sessions[role]
        if outputs is not None or self.io_binding:
            out = self._run_bound(sess, role, feed, outputs, binding)
        else:
            out = sess.run(self.output_names.get(role), feed)
        counter.session_s += time.perf_counter() - t
        return out

    def _run_bound(self, sess, role: str, feed: dict, outputs: dict | None, binding) -> list:
        """run() through IO binding (outputs None: the usual outputs, copied to numpy)."""
        bind = sess.io_binding() if binding is None else binding
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                bind.bind_cpu_input(name, np.ascontiguousarray(value))
            elif isinstance(value, ort.OrtValue):
                bind.bind_ortvalue_input(name, value)
            else:
                value.bind(bind, name)
        if outputs is None:
            names = self.output_names.get(role) or [o.name for o in sess.get_outputs()]
        for name in names if outputs is None else outputs:
            target = None if outputs is None else outputs[name]
            if target is None:
                bind.bind_output(name, self.device, self.device_id)
            else:
                target.bind(bind, name, output=True)
        sess.run_with_iobinding(bind)
        if outputs is None:
            return bind.copy_outputs_to_cpu()
        # wrapping every output costs per call: skipped when each went into a given buffer
        return bind.get_outputs() if any(v is None for v in outputs.values()) else []

    def encode(
        self, ids: list[int], counter: Counter, device: bool = False
    ) -> tuple[list, np.ndarray]:
        """One prompt alone at its own length (at least MIN_TOKENS, a masked pad after a
        one-token prompt): its cross key/values (2 per layer, [H, S, D]; device=True: OrtValues
        [1, H, S, D] left on the session's device) and mask [S]. Alone, so a prompt's states
        never depend on which prompts joined with it."""
        s = max(len(ids), MIN_TOKENS)
        x = np.full((1, s), self.pad_id, np.int64)
        mask = np.zeros((1, s), np.int64)
        x[0, : len(ids)], mask[0, : len(ids)] = ids, 1
        feed = {lay.INPUT_IDS: x, lay.ATTENTION_MASK: mask}
        if device:
            enc = self.run("encoder", feed, counter, {lay.LAST_HIDDEN_STATE: None})[0]
            outs = dict.fromkeys(self.cross_names)
            return self.run("cross", {lay.ENCODER_HIDDEN_STATES: enc}, counter, outs), mask[0]
        enc = self.run("encoder", feed, counter)[0]
        cross = self.run("cross", {lay.ENCODER_HIDDEN_STATES: enc}, counter)
        return [a[0] for a in cross], mask[0]
