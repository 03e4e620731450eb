"""stairs-bench profile: ORT's per-node profile of the graphs at the engine's call shapes,
grouped by layer part and op kind, beside the floor (no speed is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="stairs-bench profile reads graphs with onnx ([export] extra)")

from bench import profile

RATES = {"stream_bytes_per_s": 10e9, "gemm_flops_per_s": 50e9}


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_profile_groups_every_node_by_part(tiny_models, tmp_path, monkeypatch, variant):
    """Every shape asked for is profiled as the engine feeds it (1 x 1 padded to 1 x 2); each
    node lands in one layer part (so the parts add up to the kernel time); the decoder's parts
    include each sublayer, the key/value writes and the LM head; the floor is the weight bytes
    and the key/values each call reads over the streaming rate."""
    main = Path(tiny_models[variant]["main"])
    monkeypatch.setattr(profile, "measured_rates", lambda threads: RATES)
    out = tmp_path / "prof"
    argv = ["--main", str(main), "--batch-sizes", "1,3", "--tokens", "1,2", "--runs", "2"]
    assert profile.main([*argv, "--threads", "1", "--out", str(out)]) == 0
    result = json.loads((out / "profile.json").read_text())
    dec = [r for r in result["records"] if r["graph"] == "main decoder"]
    assert [r["shape"] for r in dec] == ["1 x 2", "1 x 2", "3 x 1", "3 x 2"]
    for r in dec + [r for r in result["records"] if r["graph"] == "encoder"]:
        assert sum(r["by_part"].values()) == pytest.approx(r["kernel_ms"])
        assert sum(r["by_op"].values()) == pytest.approx(r["kernel_ms"])
        assert r["wall_ms"] > 0 and r["nodes"] > 20
    want = {"self-attention", "kv writes", "cross-attention", "feed-forward", "LM head"}
    assert want <= set(dec[0]["by_part"]), dec[0]["by_part"]
    graph = main / profile.DECODER
    data = main / (profile.DECODER + "_data")
    size = graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    assert dec[0]["weight_bytes"] == size
    rate = RATES["stream_bytes_per_s"] / 1e3
    assert dec[0]["floor"]["weights_ms"] == pytest.approx(size / rate)
    # the defaults --past 96 and --source 256: per row, keys and values of 128 self slots
    # (96 + 2 new, rounded up to layout.SLOT_CHUNK = 32) and 256 encoder positions (ENC_CHUNK)
    c = json.loads((main / "config.json").read_text())
    layers = c.get("num_decoder_layers") or c["num_layers"]
    kv = 2 * layers * c["num_heads"] * c["d_kv"] * (128 + 256) * 4
    assert [r["cache_bytes"] for r in dec] == [kv, kv, 3 * kv, 3 * kv]
    assert dec[0]["floor"]["bytes_ms"] == pytest.approx((size + kv) / rate)
    assert "## main decoder" in (out / "profile.md").read_text()


def test_parts_follow_the_layer_norms():
    """Nodes after each block's norms belong to self-attention, cross-attention, feed-forward in
    turn; float scatters (elements or slices) are key/value writes, int ones position bias; the
    matmul after the final norm is the LM head."""
    norm = "SimplifiedLayerNormalization"
    nodes = [
        ("/Gather", "Gather", "float", 1.0),
        ("/layer_norm", norm, "float", 1.0),
        ("/q/MatMul", "MatMul", "float", 1.0),
        ("/ScatterElements", "ScatterElements", "int64", 1.0),
        ("/ScatterElements_1", "ScatterElements", "float", 1.0),
        ("/ScatterND", "ScatterND", "float", 1.0),
        ("/layer_norm_1", norm, "float", 1.0),
        ("/MatMul_2", "FusedMatMul", "float", 1.0),
        ("/layer.2/layer_norm", norm, "float", 1.0),
        ("/wi/MatMul", "MatMul", "float", 1.0),
        ("/final_layer_norm", norm, "float", 1.0),
        ("/MatMul_24", "FusedMatMul", "float", 1.0),
    ]
    got = profile.parts(nodes, ("self-attention", "cross-attention", "feed-forward"))
    assert got == [
        "embedding and masks", "layer norms", "self-attention", "position bias", "kv writes",
        "kv writes", "layer norms", "cross-attention", "layer norms", "feed-forward",
        "layer norms", "LM head",
    ]  # fmt: skip
