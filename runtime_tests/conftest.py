"""Fixtures: tiny random T5 models (v1.0 and v1.1) built on the fly, and the ../shared pair."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PYCODE_MAIN = SHARED / "models" / "pycode-t5-main"
PYCODE_DRAFT = SHARED / "models" / "pycode-t5-draft"
PROMPTS = SHARED / "prompts" / "pycode_public.jsonl"
T5_TOKENIZER = SHARED / "models" / "t5-small-tokenizer"

# v1.0: relu, tied embeddings, the real t5-small tokenizer (32000 pieces + 100 sentinels).
# v1.1: gated-gelu, untied, the pycode tokenizer (8192 pieces).
VARIANTS = {
    "v1_0": {
        "feed_forward_proj": "relu",
        "tie_word_embeddings": True,
        "vocab_size": 32128,
        "spiece": T5_TOKENIZER / "spiece.model",
    },
    "v1_1": {
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "vocab_size": 8192,
        "spiece": PYCODE_MAIN / "spiece.model",
    },
}


_CREATED_CACHE: list[str] = []  # the weights cache this process made (and only it removes)


def pytest_configure(config):
    """Every load in the tests (and their subprocesses) uses a weights cache of its own, never
    the user's ~/.cache/stairs."""
    if not os.environ.get("STAIRS_TEST_CACHE_DIR"):
        path = tempfile.mkdtemp(prefix="stairs-test-cache-")
        _CREATED_CACHE.append(path)
        os.environ["STAIRS_TEST_CACHE_DIR"] = path
    os.environ["STAIRS_CACHE_DIR"] = os.environ["STAIRS_TEST_CACHE_DIR"]


def pytest_unconfigure(config):
    for path in _CREATED_CACHE:
        shutil.rmtree(path, ignore_errors=True)


def unshare_works() -> bool:
    """Whether this process may make a private mount namespace (`unshare -m`): how tests run
    as root (who ignores mode bits) get a read-only or full file system of their own."""
    try:
        done = subprocess.run(["unshare", "-m", "true"], check=False, capture_output=True)
        return done.returncode == 0
    except OSError:
        return False


def need_shared():
    if not PYCODE_MAIN.is_dir():
        pytest.skip("../shared/models/pycode-t5-main is absent")


def make_tiny_t5(
    folder: Path, variant: str, seed: int, d_model: int = 64, layers: int = 2, **overrides
) -> Path:
    """Save a random-weight T5 (HF format, spiece.model inside) into folder."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    v = dict(VARIANTS[variant])
    spiece = v.pop("spiece")
    v.update(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    v.update(overrides)
    cfg = T5Config(
        d_model=d_model,
        d_ff=2 * d_model,
        d_kv=16,
        num_heads=4,
        num_layers=layers,
        num_decoder_layers=layers,
        **v,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    shutil.copy(spiece, folder / "spiece.model")
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{variant: {"main": onnx dir, "random": onnx dir of another random model, "hf": hf dir}}."""
    from export import export_model

    base = tmp_path_factory.mktemp("tiny")
    out = {}
    for variant in VARIANTS:
        hf_main = make_tiny_t5(base / "hf" / f"{variant}-main", variant, seed=1)
        # The random assistant is untied whatever the variant: random *tied* models echo their
        # last input token (logits hold e.e), so two of them agree by construction.
        hf_rand = make_tiny_t5(
            base / "hf" / f"{variant}-rand",
            variant,
            seed=2,
            d_model=32,
            layers=1,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
        # The assistant lands beside the main folder, named after its source folder.
        res = export_model(
            str(hf_main), base / "onnx" / f"{variant}-main", assistant=str(hf_rand), quiet=True
        )
        out[variant] = {"main": res.main, "random": res.assistant, "hf": hf_main}
    return out


@pytest.fixture(scope="session")
def pycode_pair(tmp_path_factory):
    """The ../shared pycode pair exported to ONNX once per test session."""
    need_shared()
    from export import export_model

    base = tmp_path_factory.mktemp("pycode")
    res = export_model(
        str(PYCODE_MAIN), base / "pycode-t5-main", assistant=str(PYCODE_DRAFT), quiet=True
    )
    return res.main, res.assistant


@pytest.fixture(scope="session")
def pycode_dtypes(tmp_path_factory):
    """{dtype: folder}: the ../shared pycode main exported fp16, int8 and int4 (weight-only), no
    assistant, once per test session (the pycode_pair fixture holds its fp32 form and draft)."""
    need_shared()
    from export import export_model

    base = tmp_path_factory.mktemp("pycode-dtypes")
    out = {}
    for d in ("fp16", "int8", "int4"):
        res = export_model(
            str(PYCODE_MAIN), base / f"pycode-t5-main-{d}", assistant=None, dtype=d, quiet=True
        )
        out[d] = res.main
    return out


@pytest.fixture(scope="module")
def eng(pycode_pair):
    """The exported pycode pair loaded on 2 threads, one Engine per test module."""
    from engine import Engine

    main, draft = pycode_pair
    return Engine.load(main, assistant=draft, threads=2)


@pytest.fixture(scope="session")
def pycode_prompts():
    """Encoder input ids of the public prompts: spiece.encode(context)[-255:] + [eos]."""
    need_shared()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(PYCODE_MAIN / "spiece.model"))
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [sp.encode(r["context"])[-255:] + [1] for r in rows]
