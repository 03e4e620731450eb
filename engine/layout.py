"""The exported folder's format, named once: file names, manifest and metadata keys, and the
graphs' input/output names. It imports only the standard library (importing it as
`engine.layout` still runs engine/__init__); export/, engine/, serve/ and bench/ take every name
from it, so a rename cannot leave one side behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# stairs.json's format_version. 2: the masked, positioned decoder and the cross key/value graph;
# 3: its attention one product per query (graph metadata QUERY_ROWS_KEY "1"); format 2 folders
# still run exactly, more slowly (the engine says so); format 1 (optimum's decoders only) refused.
FORMAT_VERSION = 3

MANIFEST = "stairs.json"
MANIFEST_EXPORT_ID = "export_id"  # stairs.json's key for the id every graph's metadata repeats
TUNE_FILE = "stairs-tune.json"  # stairs-tune's results, kept beside the manifest
# Files a previous export may hold besides those its manifest lists.
OWN_EXTRAS = frozenset({MANIFEST, TUNE_FILE})
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SPIECE_FILE = "spiece.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # its model_max_length bounds the input
TOKENIZER_FILES = (
    SPIECE_FILE,
    "tokenizer.json",
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
)

ENCODER_FILE = "encoder_model.onnx"  # optimum's name and inputs, so either exporter's loads
DECODER_FILE = "decoder_masked_model.onnx"
CROSS_FILE = "cross_kv_model.onnx"
GRAPH_FILES = (ENCODER_FILE, DECODER_FILE, CROSS_FILE)
# optimum's decoders, written only with `stairs-export --optimum` for other tools
OPTIMUM_DECODER_FILE = "decoder_model.onnx"
OPTIMUM_PAST_FILE = "decoder_with_past_model.onnx"
OPTIMUM_FILES = (OPTIMUM_DECODER_FILE, OPTIMUM_PAST_FILE)

# graph metadata: the export a graph came from (graphs of other exports copied into a folder
# are refused), and the query rows of each attention product: "1" each query its own (format
# 3), "2" the queries of a row together plus a copy of the first (format 2)
EXPORT_ID_KEY = "stairs.export_id"
QUERY_ROWS_KEY = "stairs.attention_query_rows"
# What a format 3 graph asks of whoever feeds it: encoder positions and self slots in
# multiples of these, so attention's one-query products see key counts whose tails the CPU
# kernels sum alike whatever the longest prompt or row of the call.
ENC_CHUNK = 16
SLOT_CHUNK = 32  # also the step the caches grow by (one copy every SLOT_CHUNK tokens)


def enc_width(positions: int) -> int:
    """Encoder positions held for a prompt of this many (rounded up to ENC_CHUNK)."""
    return -(-positions // ENC_CHUNK) * ENC_CHUNK


def slot_width(slots: int) -> int:
    """Self key/value slots held for this many (rounded up to SLOT_CHUNK)."""
    return -(-slots // SLOT_CHUNK) * SLOT_CHUNK


# config.json keys a main and its assistant must share
PAIR_KEYS = ("vocab_size", "pad_token_id", "eos_token_id", "decoder_start_token_id")
MAX_THREADS = 1024  # a bound on thread counts (ORT would try to start them all)

# graph inputs and outputs
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITIONS = "positions"
PAST_POSITIONS = "past_positions"
NEW_SLOTS = "new_slots"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
LAST_HIDDEN_STATE = "last_hidden_state"
LOGITS = "logits"
KV = ("key", "value")


def past_names(layers: int) -> list[str]:
    """The decoder's cache inputs: each layer's key and value buffer."""
    return [f"past_key_values.{i}.decoder.{kv}" for i in range(layers) for kv in KV]


def present_names(layers: int) -> list[str]:
    """The decoder's outputs holding the new tokens' keys and values."""
    return [f"present.{i}.decoder.{kv}" for i in range(layers) for kv in KV]


def full_names(layers: int) -> list[str]:
    """The decoder's outputs holding each whole buffer after the new tokens' writes (a device
    cache binds them to the past inputs, so the graph updates the cache in place)."""
    return [f"kv_cache.{i}.decoder.{kv}" for i in range(layers) for kv in KV]


def cross_names(layers: int) -> list[str]:
    """The cross key/value graph's outputs, the decoder's cross inputs."""
    return [f"cross_key_values.{i}.{kv}" for i in range(layers) for kv in KV]


def sha256_file(path: str | Path, block: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in blocks of `block` bytes (16 MiB: full disk speed, little
    memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
