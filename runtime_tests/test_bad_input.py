"""Bad input: every option, size and type is refused with InputError before any model runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import engine.api
from bench.core import DEFAULT_STRATEGIES, parse_strategy
from engine import STRATEGIES, Engine, InputError, LoadConfig, ProviderError
from engine import options as opt
from engine.cli import Parser, add_load_flags, load_config, read_prompts, tune_main
from engine.cli import main as generate_cli


@pytest.fixture(scope="module")
def tiny(tiny_models):
    m = tiny_models["v1_1"]
    return Engine.load(m["main"], assistant=m["random"])


@pytest.fixture
def no_model_runs(tiny, monkeypatch):
    """Any ONNX call of either model fails the test."""

    def boom(role, feed, counter):
        raise AssertionError(f"a model ran ({role}) before validation finished")

    monkeypatch.setattr(tiny.main, "run", boom)
    monkeypatch.setattr(tiny.assistant, "run", boom)
    return tiny


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading a model (creating any session) fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(engine.api, "T5Model", boom)


def run_cli(fn, args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command run in process."""
    try:
        rc = fn([str(a) for a in args])
    except SystemExit as exc:  # argparse errors exit
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, *words):
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "error:" in err
    for w in words:
        assert w in err, (w, err)


# item 4: ceilings and the memory estimate


def test_max_new_tokens_and_input_ceilings(no_model_runs):
    eng = no_model_runs
    with pytest.raises(InputError, match=r"max_new_tokens=1000000000 is over the ceiling of 4096"):
        eng.generate("x", max_new_tokens=1_000_000_000)
    with pytest.raises(InputError, match=r"max_input_tokens=100000 is over the ceiling of 8192"):
        eng.generate("x", max_input_tokens=100_000)
    with pytest.raises(InputError, match=r"limits=Limits\(max_new_tokens=N\)"):
        eng.stream("x", max_new_tokens=4097)
    # a prompt over an explicit limit at the ceiling is not told to raise the limit
    with pytest.raises(InputError, match="over the limit of 8192; pass truncation") as e:
        eng.generate([5] * 9000, max_input_tokens=8192)
    assert "raise" not in str(e.value)


def test_limits_are_per_engine(tiny, tiny_models):
    m = tiny_models["v1_1"]
    eng = Engine.load(m["main"], limits=opt.Limits(max_new_tokens=8, max_input_tokens=16))
    assert len(eng.generate([5, 6, 1], max_new_tokens=8).token_ids) <= 8
    with pytest.raises(InputError, match="ceiling of 8"):
        eng.generate([5, 6, 1], max_new_tokens=9)
    with pytest.raises(InputError, match="over the limit of 16"):
        eng.generate(
            [5] * 17, max_new_tokens=4
        )  # the model's own 512 is clamped to the engine's ceiling
    with pytest.raises(InputError, match="Limits.max_new_tokens"):
        opt.Limits(max_new_tokens=0)
    with pytest.raises(InputError, match="limits must be"):
        Engine.load(m["main"], limits={"max_new_tokens": 8})


def test_memory_estimate_refuses_what_does_not_fit(no_model_runs, monkeypatch):
    eng = no_model_runs
    monkeypatch.setattr(eng, "limits", opt.Limits(memory_bytes=100_000))
    with pytest.raises(InputError, match=r"needs an estimated .* GiB is available; lower"):
        eng.generate("def f(x):", strategy="stairs", max_new_tokens=64)
    # the machine's own memory is read when no budget is set
    monkeypatch.setattr(eng, "limits", opt.Limits())
    monkeypatch.setattr(opt, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match="only 0.00 GiB is available"):
        eng.generate("def f(x):")


def test_memory_estimate_grows_with_sizes(tiny):
    main, a = tiny.main, tiny.assistant
    greedy = opt.with_defaults("greedy", {})
    small = opt.estimate_memory(main, a, "greedy", greedy, 100, 10)
    long_in = opt.estimate_memory(main, a, "greedy", greedy, 1000, 10)
    # encoder attention scores are quadratic in the input length
    assert long_in["main encoder"] > 50 * small["main encoder"]
    stairs = opt.estimate_memory(main, a, "stairs", opt.with_defaults("stairs", {}), 100, 10)
    assert stairs["main decoder"] > small["main decoder"] and "assistant encoder" in stairs
    longer = opt.estimate_memory(main, a, "greedy", greedy, 100, 1000)
    assert longer["main decoder"] > 10 * small["main decoder"]  # the cache grows with tokens
    assert opt.available_memory() is None or opt.available_memory() > 0


# item 7: one schema, validated before anything runs

BAD_OPTIONS = [
    ("assisted", {"draft_tokens": 0}, "draft_tokens=0"),
    ("assisted", {"draft_tokens": -3}, "draft_tokens=-3"),
    ("assisted", {"draft_tokens": "x"}, "draft_tokens='x'"),
    ("assisted", {"draft_tokens": 2.5}, "draft_tokens=2.5"),
    ("assisted", {"draft_tokens": True}, "draft_tokens=True"),
    ("assisted", {"draft_tokens": 65}, "<= 64"),
    ("assisted", {"threshold": "x"}, "threshold='x'"),
    ("assisted", {"threshold": 1.5}, "threshold=1.5"),
    ("assisted", {"threshold": float("nan")}, "threshold=nan"),
    ("assisted", {"schedule": "fast"}, "'constant' or 'heuristic'"),
    ("assisted", {"batch_size": 3}, "'batch_size' (it takes"),
    ("lookup", {"draft_tokens": 0}, "draft_tokens=0"),
    ("lookup", {"draft_tokens": 2.5}, "draft_tokens=2.5"),
    ("lookup", {"min_ngram": 0}, "min_ngram=0"),
    ("lookup", {"min_ngram": 4, "max_ngram": 2}, "min_ngram <= max_ngram"),
    ("staged", {"draft_tokens": -3}, "draft_tokens=-3"),
    ("staged", {"stage2_tokens": 33}, "stage2_tokens=33"),
    ("stairs", {"batch_size": 1}, "batch_size=1"),
    ("stairs", {"layout": "diagonal"}, "'past' or 'full'"),
    ("tree", {"branches": 0}, "branches=0"),
    ("tree", {"branches": 17}, "branches=17"),
    ("greedy", {"draft_tokens": 4}, "it takes no options"),
    ("auto", {"nonsense": 1}, "'nonsense'"),
]


@pytest.mark.parametrize("strategy,options,words", BAD_OPTIONS)
def test_bad_options_fail_before_any_model_runs(no_model_runs, strategy, options, words):
    with pytest.raises(InputError, match="bad option") as e:
        no_model_runs.generate("def f(x):", strategy=strategy, **options)
    assert words in str(e.value)
    with pytest.raises(InputError):  # stream checks when called, not when first consumed
        no_model_runs.stream("def f(x):", strategy=strategy, **options)


def test_bad_strategy_and_stored_auto_choice(no_model_runs, monkeypatch):
    eng = no_model_runs
    for bad in ("magic", None, 3):
        with pytest.raises(InputError, match="unknown strategy"):
            eng.generate("x", strategy=bad)
    with pytest.raises(InputError, match="'branches' \\(it takes"):  # auto runs assisted
        eng.generate("x", strategy="auto", branches=2)
    with pytest.raises(InputError, match="draft_tokens=0"):
        eng.generate("x", strategy="auto", draft_tokens=0)


def test_schema_defaults_are_the_strategies_defaults():
    assert set(opt.STRATEGY_OPTIONS) == set(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert strategy.defaults == opt.STRATEGY_OPTIONS[name], name
        strategy.drafter([5, 1], opt.with_defaults(name, {}))  # its drafter takes them
    for name, defaults in opt.STRATEGY_OPTIONS.items():
        assert opt.validate(name, defaults) == defaults


def test_good_options_still_run_and_are_reported(tiny):
    res = tiny.generate([5, 6, 7, 1], strategy="assisted", draft_tokens=3, max_new_tokens=6)
    assert res.strategy == "assisted"
    assert res.options == {"draft_tokens": 3, "schedule": "constant", "threshold": None}
    ref = tiny.generate([5, 6, 7, 1], max_new_tokens=6).token_ids
    assert res.token_ids == ref
    assert tiny.generate([5, 6, 7, 1], strategy="lookup", max_new_tokens=6).token_ids == ref


def test_bench_specs_parse_through_the_schema():
    assert parse_strategy("assisted:draft_tokens=4,schedule=heuristic") == (
        "assisted",
        {"draft_tokens": 4, "schedule": "heuristic"},
    )
    assert parse_strategy("stairs:threshold=none") == ("stairs", {"threshold": None})
    for spec in DEFAULT_STRATEGIES:
        parse_strategy(spec)
    for spec, words in [
        ("assisted:draft_tokns=4", "'draft_tokns'"),
        ("assisted:draft_tokens=0", "draft_tokens=0"),
        ("assisted:draft_tokens=x", "draft_tokens='x'"),
        ("assisted:draft_tokens", "not option=value"),
        ("assisted:draft_tokens=4,draft_tokens=5", "given twice"),
        ("stairs:draft_tokens=4", "'draft_tokens' (it takes"),
        ("magic", "unknown strategy"),
    ]:
        with pytest.raises(InputError) as e:
            parse_strategy(spec)
        assert words in str(e.value), spec


def test_tune_candidates_are_in_the_schema():
    from engine import tune

    cands = tune._candidates(True)
    assert {n for n, _ in cands} == set(STRATEGIES) - {"greedy"}
    assert {n for n, _ in tune._candidates(False)} == {"lookup"}
    for name, options in cands:
        assert opt.validate(name, options) == options


# item 9: wrong-typed input


@pytest.mark.parametrize(
    "prompt,words",
    [
        (b"def f", "not bytes"),
        (None, "not NoneType"),
        (12, "not int"),
        ([5.0, 6.0], "position 0 is 5.0"),
        ([5, float("nan")], "position 1 is nan"),
        ([5, None], "position 1 is None"),
        ([True, 1], "position 0 is True"),
        (np.array([5.0, 1.0]), "integer ids"),
        ("  ", "empty prompt"),
        ([], "empty list"),
    ],
)
def test_wrong_typed_prompts(no_model_runs, prompt, words):
    with pytest.raises(InputError) as e:
        no_model_runs.generate(prompt)
    assert words in str(e.value)


@pytest.mark.parametrize("value", [True, "5", 2.0, 0, -1, None])
def test_wrong_typed_max_new_tokens(no_model_runs, value):
    with pytest.raises(InputError, match="max_new_tokens must be an integer >= 1"):
        no_model_runs.generate("x", max_new_tokens=value)


def test_wrong_typed_sizes_and_truncation(no_model_runs):
    with pytest.raises(InputError, match="max_input_tokens must be an integer"):
        no_model_runs.generate("x", max_input_tokens="8")
    with pytest.raises(InputError, match="truncation must be"):
        no_model_runs.generate("x", truncation="middle")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"provider": None}, "provider must be a non-empty string"),
        ({"provider": 3}, "provider must be a non-empty string"),
        ({"threads": "2"}, "threads must be None or an integer"),
        ({"threads": True}, "threads must be None or an integer"),
        ({"threads": 0}, "threads must be None or an integer"),
        ({"assistant_threads": 2.0}, "assistant_threads"),
        ({"provider_options": "x"}, "provider_options"),
        ({"io_binding": "yes"}, "io_binding must be True or False"),
        ({"verify": 1}, "verify must be True or False"),
    ],
)
def test_load_arguments_are_checked_before_any_session(tiny_models, no_model_loads, kwargs, words):
    with pytest.raises(InputError, match=words):
        Engine.load(tiny_models["v1_1"]["main"], **kwargs)


def test_main_path_type_and_unknown_provider(tiny_models):
    with pytest.raises(InputError, match="main must be a folder path"):
        Engine.load(None)
    with pytest.raises(ProviderError, match="unknown provider"):
        Engine.load(tiny_models["v1_1"]["main"], provider="tpu")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"provider": ""}, "provider must be a non-empty string"),
        ({"assistant_provider": 1}, "assistant_provider must be a non-empty string"),
        ({"threads": 1025}, "threads must be None or an integer from 1 to 1024"),
        ({"assistant_threads": 0}, "assistant_threads must be None or an integer"),
        ({"provider_options": ["x"]}, "provider_options must be a dict or None"),
        ({"shared_thread_pool": "no"}, "shared_thread_pool must be True or False"),
        ({"weights_cache": ""}, "weights_cache must be True, False or a folder path"),
        ({"weights_cache": 0.5}, "weights_cache must be True, False or a folder path"),
        ({"kv_cache": "gpu"}, "kv_cache must be one of auto, numpy, device"),
    ],
)
def test_a_bad_load_config_is_refused(kwargs, words):
    with pytest.raises(InputError, match=words):
        LoadConfig(**kwargs)


def test_load_config_and_keyword_settings(tiny_models, no_model_loads, tmp_path):
    """Engine.load takes its load settings as config=LoadConfig(...) or as keywords, not both;
    the commands' flags make the same LoadConfig."""
    main = tiny_models["v1_1"]["main"]
    with pytest.raises(InputError, match=r"not both \(config and threads\)"):
        Engine.load(main, threads=2, config=LoadConfig(threads=2))
    with pytest.raises(InputError, match="config must be an engine.LoadConfig"):
        Engine.load(main, config={"threads": 2})
    with pytest.raises(AssertionError, match="a model was loaded"):  # checked, then loading
        Engine.load(main, config=LoadConfig(threads=2, kv_cache="numpy"))
    assert LoadConfig(weights_cache=tmp_path).weights_cache == str(tmp_path)
    p = Parser()
    add_load_flags(p)
    got = load_config(p.parse_args(["--threads", "3", "--no-verify", "--no-weights-cache"]))
    assert got == LoadConfig(threads=3, verify=False, weights_cache=False)
    assert load_config(p.parse_args([])) == LoadConfig()


def test_truncation_of_id_lists(tiny):
    ids = [10, 11, 12, 13, 14, 15, 1]
    assert tiny.encode(ids, 4, "left")[0].tolist() == [13, 14, 15, 1]
    assert tiny.encode(ids, 4, "right")[0].tolist() == [10, 11, 12, 1]
    assert tiny.encode(ids[:-1], 4, "left")[0].tolist() == [12, 13, 14, 15]  # no EOS to keep
    assert tiny.encode(ids[:-1], 4, "right")[0].tolist() == [10, 11, 12, 13]
    assert tiny.encode(ids, 7)[0].tolist() == ids  # short enough: untouched
    res = tiny.generate(ids, max_input_tokens=4, truncation="left", max_new_tokens=4)
    assert res.token_ids == tiny.generate([13, 14, 15, 1], max_new_tokens=4).token_ids
    with pytest.raises(InputError, match="over the limit of 4"):
        tiny.encode(ids, 4)


# item 10: prompt files


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_prompts_names_the_line(tmp_path):
    good = ['{"context": "a"}', "", '{"prompt": "b"}', '{"text": "c", "other": 1}']
    assert read_prompts(write(tmp_path / "ok.jsonl", good)) == ["a", "b", "c"]
    assert read_prompts(tmp_path / "ok.jsonl", 2) == ["a", "b"]
    # lines after the first n are not read at all
    assert read_prompts(write(tmp_path / "tail.jsonl", [good[0], "{broken"]), 1) == ["a"]
    for bad, words in [
        ("{not json", ":3: not valid JSON"),
        ('["a", "b"]', ":3: a JSON object is needed, not a list"),
        ('{"question": "a"}', ":3: no 'context', 'prompt' or 'text' field"),
        ('{"context": 5}', ":3: 'context' must be a non-empty string"),
    ]:
        f = write(tmp_path / "bad.jsonl", ['{"context": "a"}', "", bad])
        with pytest.raises(InputError) as e:
            read_prompts(f)
        assert words in str(e.value)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "a"}\n{"context": "\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8 text"):
        read_prompts(tmp_path / "latin1.jsonl")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(InputError, match="integer >= 1"):
        read_prompts(tmp_path / "ok.jsonl", 0)


# CLI: exit 2, one line, no traceback, nothing loaded


@pytest.mark.parametrize(
    "args,words",
    [
        (["--strategy", "assisted", "--draft-tokens", "-1"], "draft_tokens=-1"),
        (["--strategy", "assisted", "--draft-tokens", "0"], "draft_tokens=0"),
        (["--strategy", "assisted", "--draft-tokens", "x"], "invalid int value"),
        (["--strategy", "stairs", "--batch-size", "0"], "batch_size=0"),
        (["--strategy", "stairs", "--batch-size", "3", "--draft-tokens", "2"], "not both"),
        (["--strategy", "tree", "--branches", "0"], "branches=0"),
        (["--strategy", "greedy", "--draft-tokens", "4"], "'draft_tokens' (it takes"),
        (["--strategy", "lookup", "--branches", "2"], "'branches' (it takes"),
        (["--strategy", "assisted", "--threshold", "nan"], "threshold=nan"),
        (["--max-new-tokens", "1000000000"], "not from 1 to 4096"),
        (["--max-new-tokens", "0"], "not from 1 to 4096"),
        (["--max-input-tokens", "100000"], "not from 1 to 8192"),
        (["--threads", "0"], "--threads"),
        (["--strategy", "magic"], "invalid choice"),
    ],
)
def test_cli_bad_settings_exit_2_with_one_line(tiny_models, no_model_loads, capsys, args, words):
    m = tiny_models["v1_1"]
    base = ["--main", m["main"], "--assistant", m["random"]]
    rc, _, err = run_cli(generate_cli, [*base, *args, "def f():"], capsys)
    assert_one_line_error(rc, err, words)


def test_cli_assistant_needed_and_prompt_files(tiny_models, no_model_loads, capsys, tmp_path):
    main = tiny_models["v1_1"]["main"]
    rc, _, err = run_cli(generate_cli, ["--main", main, "--strategy", "stairs", "x"], capsys)
    assert_one_line_error(rc, err, "needs --assistant")
    f = write(tmp_path / "p.jsonl", ['{"context": "a"}', '["b"]'])
    rc, _, err = run_cli(generate_cli, ["--main", main, "--prompts", f], capsys)
    assert_one_line_error(rc, err, "p.jsonl:2: a JSON object is needed")
    rc, _, err = run_cli(generate_cli, ["--main", main, "--prompts", f, "-n", "0"], capsys)
    assert_one_line_error(rc, err, "-n")
    rc, _, err = run_cli(tune_main, ["--main", main, "--prompts", f], capsys)
    assert_one_line_error(rc, err, "p.jsonl:2:")
    rc, _, err = run_cli(tune_main, ["--main", main, "--prompts", f, "-n", "0"], capsys)
    assert_one_line_error(rc, err, "-n")


def test_cli_prompt_over_the_limit_is_refused_before_generating(tiny_models, capsys, tmp_path):
    m = tiny_models["v1_1"]
    f = write(tmp_path / "p.jsonl", ['{"context": "short"}', json.dumps({"context": "a " * 50})])
    args = ["--main", m["main"], "--prompts", f, "--max-input-tokens", "8"]
    rc, out, err = run_cli(generate_cli, args, capsys)
    assert_one_line_error(rc, err, "over the limit of 8")
    assert out == ""  # the first prompt did not run either


def test_cli_entry_point_prints_no_traceback(tiny_models):
    m = tiny_models["v1_1"]
    cmd = [sys.executable, "-m", "engine.cli", "--main", str(m["main"]), "--draft-tokens", "-1"]
    p = subprocess.run(
        [*cmd, "--strategy", "lookup", "x"], capture_output=True, text=True, check=False
    )
    assert_one_line_error(p.returncode, p.stderr, "draft_tokens=-1")


# item 12: CLI output


def test_cli_json_reports_what_ran(tiny_models, capsys):
    m = tiny_models["v1_1"]
    base = ["--main", m["main"], "--assistant", m["random"], "--max-new-tokens", "4"]
    rc, out, err = run_cli(generate_cli, [*base, "--strategy", "auto", "--json", "x"], capsys)
    assert rc == 0, err
    row = json.loads(out)
    assert row["requested"] == "auto" and row["strategy"] in STRATEGIES
    table = row["options"].pop("auto_draft_tokens")  # auto: draft tokens by active requests
    assert table and all(int(n) >= 1 and k >= 0 for n, k in table.items())
    assert opt.validate(row["strategy"], row["options"]) == row["options"]
    assert set(row["options"]) == set(opt.STRATEGY_OPTIONS[row["strategy"]])


def test_cli_text_output_of_prompt_files_has_headers(tiny_models, capsys, tmp_path):
    m = tiny_models["v1_1"]
    f = write(tmp_path / "p.jsonl", ['{"context": "a"}', '{"text": "b"}', '{"prompt": "c"}'])
    args = ["--main", m["main"], "--prompts", f, "-n", "2", "--max-new-tokens", "3", "--no-verify"]
    rc, out, err = run_cli(generate_cli, args, capsys)
    assert rc == 0, err
    headers = [line for line in out.splitlines() if line.startswith("### prompt")]
    assert headers == ["### prompt 1", "### prompt 2"]
    rc, out, _ = run_cli(generate_cli, [*args, "--json"], capsys)
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == [1, 2]


def test_cli_help_shows_defaults(capsys):
    rc, out, _ = run_cli(generate_cli, ["--help"], capsys)
    assert rc == 0
    text = " ".join(out.split())
    assert "(default: 64)" in text and "(default: greedy)" in text
    assert "assisted 5" in text and "tree 4" in text  # per-strategy option defaults
    assert "--no-verify" in text


def test_every_option_has_help_showing_its_default_once():
    """stairs-generate, stairs-tune, stairs-verify and stairs-serve: each option's help says
    its default exactly once (a required option has none), never "(default: None)"."""
    import argparse

    from engine import cli
    from serve import cli as serve_cli

    parsers = [
        cli._generate_parser(),
        cli._tune_parser(),
        cli._verify_parser(),
        serve_cli._parser(),
    ]
    for p in parsers:
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or a.dest == "help":
                continue
            assert a.help, f"{p.prog} {a.option_strings[0]}: no help"
            text = fmt._expand_help(a)
            assert text.count("default") == (0 if a.required else 1), (p.prog, text)
            assert "(default: None)" not in text


def test_memory_estimate_is_the_strategies_row_shape(tiny):
    """Every strategy is one row of the scheduler: stairs of 7 is a row of 7 tokens (as assisted
    with 6 drafts), a tree of 4 paths x 4 a row of 17 (as assisted with 16)."""
    main, a = tiny.main, tiny.assistant

    def dec(name, **o):
        return opt.estimate_memory(main, a, name, opt.with_defaults(name, o), 200, 256)

    assert (
        dec("stairs", batch_size=7)["main decoder"]
        == dec("assisted", draft_tokens=6)["main decoder"]
    )
    tree = dec("tree", branches=4, draft_tokens=4)
    assert tree["main decoder"] == dec("assisted", draft_tokens=16)["main decoder"]
    assert tree["assistant decoder"] > dec("assisted", draft_tokens=4)["assistant decoder"]
    assert dec("greedy")["main decoder"] < dec("assisted", draft_tokens=4)["main decoder"]
