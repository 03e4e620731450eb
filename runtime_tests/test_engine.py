"""Engine API, bad input, tokenizer parity, providers, isolation from torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import T5_TOKENIZER

from engine import (
    Engine,
    InputError,
    ModelFileError,
    NonFiniteLogitsError,
    PairMismatchError,
    ProviderError,
)
from engine import providers as prov
from engine.cli import main as generate_cli
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_models):
    m = tiny_models["v1_1"]
    return Engine.load(m["main"], assistant=m["random"])


def test_engine_never_imports_heavy_packages():
    code = (
        "import sys, engine; bad = [m for m in ('torch', 'transformers', 'optimum') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_text_prompt_stream_and_result(tiny):
    res = tiny.generate("def add(a, b):", strategy="assisted", max_new_tokens=10)
    assert res.token_ids == tiny.generate("def add(a, b):", max_new_tokens=10).token_ids
    assert len(res.token_ids) <= 10 and res.text == tiny.main.tokenizer.decode(res.token_ids)
    pieces = list(tiny.stream("def add(a, b):", strategy="assisted", max_new_tokens=10))
    assert "".join(pieces) == res.text
    s = res.stats
    assert s.new_tokens == len(res.token_ids) and s.main_calls >= 1
    assert s.total_s >= s.session_s > 0 and s.encoder_s > 0
    assert set(s.as_dict()) >= {"acceptance_rate", "tokens_per_main_call", "overhead_s"}


def _edit_logits(out: list, bound: tuple, edit) -> list:
    """A decoder call's result with its logits through edit (numpy -> numpy), wherever the
    call site reads them: a host array it bound as the output (edited in place), an OrtValue
    (replaced by a new one: a wrapped array may be freed) or a numpy array (replaced)."""
    import onnxruntime as ort

    target = bound[0].get("logits") if bound and bound[0] else None
    if isinstance(getattr(target, "array", None), np.ndarray):  # engine.cache._Host
        rows = target.array[: target.n]
        rows[...] = edit(rows.copy())
        return out
    if isinstance(out[0], ort.OrtValue):
        logits = edit(out[0].numpy().copy())
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(logits.shape), logits.dtype)
        value.update_inplace(logits)
        return [value, *out[1:]]
    return [edit(out[0].copy()), *out[1:]]


def test_stops_at_eos_and_max_new_tokens(tiny, monkeypatch):
    ref = tiny.generate([5, 6, 7, 1], max_new_tokens=7)
    assert len(ref.token_ids) == 7 or ref.token_ids[-1] == 1
    for strategy in ("assisted", "stairs", "lookup", "staged"):
        assert (
            tiny.generate([5, 6, 7, 1], strategy=strategy, max_new_tokens=7).token_ids
            == ref.token_ids
        )
    # Force EOS as the third token: every strategy must stop right there.
    real = tiny.main.run

    def eos_third(role, feed, counter, *bound):
        out = real(role, feed, counter, *bound)
        if role == "decoder":  # the logits at decoder position 3 pick EOS

            def eos(logits):
                logits[feed["positions"] == 3, 1] = 1e9
                return logits

            out = _edit_logits(out, bound, eos)
        return out

    monkeypatch.setattr(tiny.main, "run", eos_third)
    for strategy in ("greedy", "assisted", "stairs", "lookup", "staged"):
        ids = tiny.generate([5, 6, 7, 1], strategy=strategy, max_new_tokens=20).token_ids
        assert len(ids) == 4 and ids[-1] == 1, strategy


def test_each_decoder_call_returns_logits_of_its_own(tiny):
    """ORT writes a call's logits straight into a host array; a caller may still hold them
    after the next call (a drafter reading its rows), so no two calls share that array."""
    from engine.cache import BatchCache
    from engine.stats import Counter

    cache = BatchCache(tiny.main)
    assert cache.in_place_writes  # the path that binds the logits' array
    cross, mask = tiny.main.encode([5, 6, 7, 1], Counter())
    cache.add("r", cross, mask)
    first = cache.run(np.array([[0, 5]]), np.array([2]), Counter())
    kept = first.copy()
    second = cache.run(np.array([[6, 7]]), np.array([2]), Counter())
    assert not np.shares_memory(first, second)
    assert np.array_equal(first, kept) and not np.array_equal(first, second)


def test_bad_input_is_refused_clearly(tiny):
    with pytest.raises(InputError, match="empty prompt"):
        tiny.generate("   ")
    with pytest.raises(InputError, match="empty list"):
        tiny.generate([])
    with pytest.raises(InputError, match="out of range"):
        tiny.generate([5, 99999])
    with pytest.raises(InputError, match="over the limit of 8"):
        tiny.generate("a b c d e f g h i j k l", max_input_tokens=8)
    ids = tiny.encode("a b c d e f g h i j k l", max_input_tokens=8, truncation="left")
    assert ids.shape == (1, 8) and ids[0, -1] == 1
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny.generate("x", max_new_tokens=0)
    with pytest.raises(InputError, match="unknown strategy"):
        tiny.generate("x", strategy="magic")
    with pytest.raises(InputError, match="must be >= 1"):
        tiny.generate("x", strategy="tree", branches=0)
    with pytest.raises(InputError, match="bad option"):
        tiny.generate("x", strategy="assisted", nonsense=3)
    with pytest.raises(InputError, match="needs an assistant"):
        Engine(tiny.main).generate("x", strategy="assisted")


def test_nan_logits_raise_naming_model_and_step(tiny, monkeypatch):
    real = tiny.main.run
    calls = {"n": 0}

    def nan_later(role, feed, counter, *bound):
        out = real(role, feed, counter, *bound)
        if role == "decoder":
            calls["n"] += 1
            if calls["n"] == 3:  # the third main call: decoder step 2
                out = _edit_logits(out, bound, lambda x: np.full_like(x, np.nan))
        return out

    monkeypatch.setattr(tiny.main, "run", nan_later)
    with pytest.raises(
        NonFiniteLogitsError, match=r"main produced NaN/inf logits at decoder step 2"
    ):
        tiny.generate([5, 6, 7, 1], max_new_tokens=10)


def test_pair_mismatch_is_refused(tiny_models):
    m1, m0 = tiny_models["v1_1"]["main"], tiny_models["v1_0"]["main"]
    with pytest.raises(PairMismatchError, match="vocab_size: main 8192 vs assistant 32128"):
        Engine.load(m1, assistant=m0)


def test_missing_and_corrupt_model_files(tiny_models, tmp_path):
    src = tiny_models["v1_1"]["main"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    (broken / "decoder_masked_model.onnx").unlink()
    with pytest.raises(ModelFileError, match="missing decoder_masked_model.onnx"):
        Engine.load(broken)
    shutil.copy(src / "decoder_masked_model.onnx", broken / "decoder_masked_model.onnx")
    data = (src / "encoder_model.onnx").read_bytes()
    (broken / "encoder_model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        Engine.load(broken)
    (broken / "stairs.json").unlink()  # without a manifest onnxruntime itself must refuse it
    with pytest.raises(ModelFileError, match="encoder_model.onnx: cannot load"):
        Engine.load(broken)


def test_unknown_and_unavailable_providers(tiny_models, monkeypatch, capsys):
    main = tiny_models["v1_1"]["main"]
    with pytest.raises(ProviderError, match="unknown provider 'tpu'.*available here: cpu"):
        Engine.load(main, provider="tpu")
    with pytest.raises(ProviderError, match="'cuda' is not available.*available: cpu"):
        Engine.load(main, provider="cuda")
    assert generate_cli(["--main", str(main), "--provider", "cuda", "x"]) == 2
    assert "available: cpu" in capsys.readouterr().err
    assert Engine.load(main, provider="auto").main.provider == "cpu"


def test_silent_fallback_is_detected(monkeypatch):
    class FakeSession:
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(prov, "available", lambda: ["cuda", "cpu"])
    assert prov.resolve("auto") == "cuda"
    with pytest.raises(
        ProviderError,
        match="asked for CUDAExecutionProvider but the session runs on CPUExecutionProvider",
    ):
        prov.check_loaded(FakeSession(), "x", "cuda", "x.onnx", explicit=True)
    prov.check_loaded(FakeSession(), "x", "cuda", "x.onnx", explicit=False)  # auto: log only
    opts = prov.provider_list("coreml")
    assert opts[0][0] == "CoreMLExecutionProvider" and opts[0][1]["ModelFormat"] == "MLProgram"


def test_threads_give_the_same_tokens_as_serial(tiny):
    prompts = [
        [int(t) for t in np.random.default_rng(i).integers(3, 8000, 12)] + [1] for i in range(8)
    ]
    serial = [tiny.generate(p, strategy="assisted", max_new_tokens=16).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(
            pool.map(
                lambda p: tiny.generate(p, strategy="assisted", max_new_tokens=16).token_ids,
                prompts,
            )
        )
    assert threaded == serial


def test_cli_json(tiny_models, tiny, capsys):
    m = tiny_models["v1_1"]
    assert (
        generate_cli(
            [
                "--main",
                str(m["main"]),
                "--assistant",
                str(m["random"]),
                "--strategy",
                "stairs",
                "--draft-tokens",
                "3",
                "--max-new-tokens",
                "5",
                "--json",
                "def f():",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "stairs" and len(out["token_ids"]) <= 5
    assert out["token_ids"] == tiny.generate("def f():", max_new_tokens=5).token_ids
    assert out["stats"]["main_calls"] >= 1


def test_cli_shared_thread_pool_flag_gives_the_same_tokens(tiny_models, capsys):
    """stairs-generate --shared-thread-pool (a subprocess: the pool is process-wide) runs on that
    pool and prints the tokens the per-session run prints."""
    m = tiny_models["v1_1"]
    args = ["--main", str(m["main"]), "--assistant", str(m["random"]), "--strategy", "assisted"]
    args += ["--max-new-tokens", "6", "--threads", "2", "--json", "def f():"]
    assert generate_cli(args) == 0
    own = json.loads(capsys.readouterr().out)["token_ids"]
    # the pool must really be the process-wide one, and stairs-tune keys its tunings by it
    code = (
        "import sys; from engine.cli import main; from engine import Engine; import engine.tune"
        " as t; from engine.providers import shared_pool_in_use as used\n"
        "rc = main(sys.argv[1:]); k = t.key(Engine.load(sys.argv[2], threads=2))\n"
        "sys.exit(rc or (0 if used(2) and k.endswith('|shared') else 5))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *args, "--shared-thread-pool"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["token_ids"] == own


TEXTS = [
    "translate English to German: My dog is cute.",
    "Hello   world\n\tindented",
    "summarize: The <extra_id_0> sat on <extra_id_1>.",
    "a</s>b <pad> c<unk>",
    "Ünïcödé — ça marche? 日本語",
    "x = [i**2 for i in range(10)]  # squares",
    " leading",
    "trailing  ",
    "<extra_id_99> edge <extra_id_5>",
]


def test_token_ids_match_hf_t5tokenizer():
    transformers = pytest.importorskip("transformers")
    if not T5_TOKENIZER.is_dir():
        pytest.skip("../shared/models/t5-small-tokenizer is absent")
    hf = transformers.T5Tokenizer.from_pretrained(T5_TOKENIZER)
    ours = Tokenizer(T5_TOKENIZER / "spiece.model", 32128, 1, 0)
    for text in TEXTS:
        assert ours.encode(text) + [1] == hf(text).input_ids, text


def test_io_binding_path_gives_identical_tokens(tiny_models):
    m = tiny_models["v1_0"]
    plain = Engine.load(m["main"], assistant=m["random"])
    bound = Engine.load(m["main"], assistant=m["random"], io_binding=True)
    assert bound.main.io_binding and not plain.main.io_binding
    for i in range(6):
        prompt = [int(t) for t in np.random.default_rng(i).integers(3, 30000, 10)] + [1]
        for strategy in ("greedy", "assisted", "stairs", "tree"):
            assert (
                bound.generate(prompt, strategy=strategy, max_new_tokens=12).token_ids
                == plain.generate(prompt, strategy=strategy, max_new_tokens=12).token_ids
            )


def test_assistant_on_another_provider_setting(tiny_models):
    m = tiny_models["v1_1"]
    eng = Engine.load(m["main"], assistant=m["random"], provider="auto", assistant_provider="cpu")
    assert eng.main.provider == "cpu" and eng.assistant.provider == "cpu"


def test_tuned_assistant_threads_are_used(tiny_models, tmp_path):
    """Engine.load takes the assistant thread count stairs-tune stored for this pair/setting."""
    m = tiny_models["v1_0"]
    main = tmp_path / "main"
    shutil.copytree(m["main"], main)
    key = f"{m['random'].resolve().name}|cpu|2"
    (main / "stairs-tune.json").write_text(
        json.dumps({key: {"strategy": "assisted", "options": {}, "assistant_threads": 1}})
    )
    assert Engine.load(main, assistant=m["random"], threads=2).assistant.threads == 1
    assert (
        Engine.load(main, assistant=m["random"], threads=2, assistant_threads=2).assistant.threads
        == 2
    )
    assert Engine.load(main, assistant=m["random"], threads=3).assistant.threads == 3  # not tuned


def test_shared_pool_serves_every_later_session_and_stays_exact(tiny_models, caplog):
    """Once the process-wide pool exists ORT refuses per-session pools: a later engine of another
    thread count (or without shared_thread_pool) joins it with a warning, and stays exact. Run in
    a subprocess: the pool is process-wide."""
    m = tiny_models["v1_1"]
    code = f"""
import logging, sys
from engine import Engine
ref = Engine.load({str(m["main"])!r}, assistant={str(m["main"])!r}, threads=2, shared_thread_pool=True)
a = ref.generate([5, 6, 7, 1], strategy="assisted", draft_tokens=3, max_new_tokens=8).token_ids
logging.basicConfig(level=logging.WARNING)
other = Engine.load({str(m["main"])!r}, threads=1)  # no shared pool asked: joins it anyway
b = other.generate([5, 6, 7, 1], max_new_tokens=8).token_ids
sys.exit(0 if a == b else 3)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "serves this session too" in res.stderr


def test_session_pools_spin_only_while_their_own_run_lasts(pycode_pair):
    """Per-session pools spin between a call's ops and stop when the run returns: after a main
    call the process uses (almost) no CPU, so the assistant's next call has both cores. Run in a
    subprocess: this process's other threads would count."""
    so = prov.session_options(2)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    code = f"""
import sys, time
import onnxruntime as ort
from bench import profile as P
from engine.providers import session_options
path = {str(pycode_pair[0] / "decoder_masked_model.onnx")!r}
s = ort.InferenceSession(path, session_options(2), providers=["CPUExecutionProvider"])
feed = P.decoder_feed(s, P.engine_shape(8, 1, 32, 64))
for _ in range(5):
    s.run(P.outputs(s), feed)
c0, w0 = time.process_time(), time.perf_counter()
time.sleep(0.3)
print((time.process_time() - c0) / (time.perf_counter() - w0))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout) < 0.05, f"{res.stdout} CPU-s/s while idle after a run"
