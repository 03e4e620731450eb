"""`stairs-generate`: thin command line over Engine.generate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import options as opt
from .errors import EngineError, InputError
from .layout import MANIFEST, MAX_THREADS
from .verify import print_folder_check
from .weights import verify_cache_main

PROMPT_KEYS = ("context", "prompt", "text")
ASSISTANT_HELP = "exported assistant model folder (default: none)"
MAX_PROMPTS = 100_000  # -n ceiling: a prompts file is read into memory


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and each option's default shown once in --help
    (every command's parser)."""

    def __init__(self, **kw):
        super().__init__(formatter_class=Help, **kw)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Help(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help says its default itself (as
    an option whose default is None must: what happens when it is not given); a switch is off
    unless given. Required options and positionals have no default to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text:
            return text
        if action.default is argparse.SUPPRESS:  # --help
            return text
        if action.nargs == 0:
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def read_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """The first n prompts of a JSONL file (each line an object with 'context', 'prompt' or
    'text'); InputError names the file and line of anything else. n=None: all of them."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"the number of prompts must be an integer >= 1, got {n!r}")
    prompts: list[str] = []
    with open(path, "rb") as f:  # decoded line by line, so an error can name its line
        for lineno, line in enumerate(f, 1):
            if n is not None and len(prompts) >= n:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: not UTF-8 text ({exc.reason})") from None
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{where}: a JSON object is needed, not a {type(row).__name__}")
            key = next((k for k in PROMPT_KEYS if k in row), None)
            if key is None:
                raise InputError(f"{where}: no 'context', 'prompt' or 'text' field")
            if not isinstance(row[key], str) or not row[key].strip():
                raise InputError(f"{where}: '{key}' must be a non-empty string")
            prompts.append(row[key])
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


def _option_help(name: str) -> str:
    o = opt.OPTIONS[name]
    takes = [
        f"{s} {'off' if d[name] is None else d[name]}"
        for s, d in opt.STRATEGY_OPTIONS.items()
        if name in d
    ]
    allowed = o.describe().replace(" (or None)", "")  # not given = off
    return f"{o.help}; {allowed}; default: {', '.join(takes)}"


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per schema option (--draft-tokens ...), typed by the schema; None if not given."""
    for name, o in opt.OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        help_ = _option_help(name)
        if name == "draft_tokens":
            help_ += "; stairs: batch_size = K + 1"
        if o.choices:
            p.add_argument(flag, choices=o.choices, help=help_)
        else:
            p.add_argument(flag, type=o.type, metavar=name.upper(), help=help_)


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """--provider, --threads, --no-verify, --shared-thread-pool, --kv-cache, --weights-cache DIR
    and --no-weights-cache: the LoadConfig of every command that loads a pair (load_config)."""
    d = opt.LoadConfig()
    p.add_argument("--provider", default=d.provider, help="cpu, cuda, coreml or auto")
    p.add_argument(
        "--threads",
        type=opt.count_type(MAX_THREADS),
        help="ORT threads per session (default: ORT's choice)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files")
    p.add_argument(
        "--shared-thread-pool",
        action="store_true",
        help="one process-wide ORT thread pool, spinning, for every session (2 cores: faster for"
        " 1-2 requests, level at 4-16; several server workers on the same cores not measured;"
        " ORT then refuses the process's other sessions unless they set"
        " use_per_session_threads=False)",
    )
    p.add_argument(
        "--kv-cache",
        choices=opt.KV_CACHES,
        default=d.kv_cache,
        help="where decoder key/values live: numpy (host), device (OrtValues on the provider's"
        " device, updated in place) or auto (device on CUDA, else numpy)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--weights-cache",
        metavar="DIR",
        help="where prepacked weights are written once and memory-mapped (default:"
        " $STAIRS_CACHE_DIR or ~/.cache/stairs)",
    )
    g.add_argument(
        "--no-weights-cache",
        action="store_true",
        help="plain sessions: every weight copied and repacked at each load, and no hash"
        " remembered",
    )


def load_config(a: argparse.Namespace) -> opt.LoadConfig:
    """The LoadConfig of add_load_flags' flags (InputError on a bad value)."""
    return opt.LoadConfig(
        provider=a.provider,
        threads=a.threads,
        verify=not a.no_verify,
        shared_thread_pool=a.shared_thread_pool,
        weights_cache=False if a.no_weights_cache else (a.weights_cache or True),
        kv_cache=a.kv_cache,
    )


def _generate_parser() -> Parser:
    """stairs-generate's flags."""
    p = Parser(prog="stairs-generate", description=__doc__)
    p.add_argument("prompt", nargs="?", help="text prompt (or use --prompts)")
    p.add_argument("--main", required=True, help="exported main model folder")
    p.add_argument("--assistant", help=ASSISTANT_HELP)
    p.add_argument(
        "--strategy",
        default="greedy",
        choices=opt.STRATEGY_NAMES,
        help="auto: assisted with the draft length stairs-tune measured per batch size",
    )
    add_option_flags(p)
    p.add_argument(
        "--max-new-tokens",
        type=opt.count_type(opt.MAX_NEW_TOKENS),
        default=64,
        help=f"at most {opt.MAX_NEW_TOKENS}",
    )
    p.add_argument(
        "--max-input-tokens",
        type=opt.count_type(opt.MAX_INPUT_TOKENS),
        help=f"input limit (default: the model's, at most {opt.MAX_INPUT_TOKENS})",
    )
    p.add_argument(
        "--truncation",
        choices=["left", "right"],
        help="cut long inputs on this side (default: refuse them)",
    )
    p.add_argument(
        "--prompts",
        help="JSONL file; each line's 'context', 'prompt' or 'text' (default: none: PROMPT)",
    )
    p.add_argument(
        "-n",
        type=opt.count_type(MAX_PROMPTS),
        help="only the first N prompts of --prompts (default: all)",
    )
    p.add_argument(
        "--batch",
        type=opt.count_type(opt.MAX_BATCH_SIZE),
        default=1,
        help="generate this many prompts of --prompts together, sharing main calls (any "
        "strategy; --batch-size is stairs' rows)",
    )
    p.add_argument(
        "--json", action="store_true", help="print strategy, options, ids, text, stats as JSON"
    )
    add_load_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from engine import Engine, EngineError
    from engine.strategies import NEEDS_ASSISTANT

    p = _generate_parser()
    a = p.parse_args(argv)
    if (a.prompt is None) == (a.prompts is None):
        p.error("give either a PROMPT or --prompts FILE")
    if a.n is not None and a.prompts is None:
        p.error("-n needs --prompts")
    try:
        # Everything that can be checked without the models is checked before loading them.
        opts = opt.flag_options(a.strategy, {k: getattr(a, k) for k in opt.OPTIONS})
        if a.strategy in NEEDS_ASSISTANT and not a.assistant:
            raise InputError(f"strategy {a.strategy!r} needs --assistant DIR")
        prompts = read_prompts(a.prompts, a.n) if a.prompts else [a.prompt]
        eng = Engine.load(a.main, a.assistant, config=load_config(a))
        # ...and every prompt before the first generation (--batch: as the scheduler runs it,
        # e.g. stairs and tree in one row, auto as adaptive speculation)
        args = (a.strategy, a.max_new_tokens, a.max_input_tokens, a.truncation)
        plans = [eng.plan(p_, *args, **opts) for p_ in prompts]
        failed = False
        for i, res in enumerate(_results(eng, a.batch, plans), 1):
            if isinstance(res, EngineError):
                print(f"stairs-generate: prompt {i}: error: {_one_line(res)}", file=sys.stderr)
                failed = True
            elif a.json:
                row = {"strategy": res.strategy, "options": res.options}
                if a.strategy != res.strategy:
                    row["requested"] = a.strategy
                if a.prompts:
                    row["prompt"] = i
                row.update(token_ids=res.token_ids, text=res.text, stats=res.stats.as_dict())
                print(json.dumps(row), flush=True)
            else:
                if a.prompts:
                    print(f"### prompt {i}")
                print(res.text, flush=True)
        if failed:
            return 2
    except (EngineError, OSError) as exc:
        print(f"stairs-generate: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _results(eng, batch: int, plans):
    """Results in order: one generation at a time, or `batch` plans sharing main calls."""
    for i in range(0, len(plans), batch):
        if batch == 1:
            yield eng.execute(plans[i])
        else:
            yield from eng.execute_batch(plans[i : i + batch])


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _tune_parser() -> Parser:
    """stairs-tune's flags."""
    p = Parser(prog="stairs-tune", description=tune_main.__doc__)
    p.add_argument("--main", required=True, help="exported main model folder")
    p.add_argument("--assistant", help=ASSISTANT_HELP)
    p.add_argument("--prompts", required=True, help="JSONL: 'context', 'prompt' or 'text'")
    p.add_argument("-n", type=opt.count_type(MAX_PROMPTS), default=8, help="calibration prompts")
    p.add_argument(
        "--max-new-tokens",
        type=opt.count_type(opt.MAX_NEW_TOKENS),
        default=64,
        help=f"tokens generated per prompt, at most {opt.MAX_NEW_TOKENS}",
    )
    p.add_argument(
        "--max-input-tokens",
        type=opt.count_type(opt.MAX_INPUT_TOKENS),
        default=256,
        help="longer prompts keep their end",
    )
    add_load_flags(p)
    p.add_argument(
        "--batch-sizes",
        metavar="B,B,...",
        help="also measure batched auto's draft length at these batch sizes (e.g. 1,2,4,8,16;"
        " default: batch size 1 only); above the largest, auto keeps its untuned entries",
    )
    return p


def tune_main(argv: list[str] | None = None) -> int:
    """`stairs-tune`: calibrate strategy='auto' for a pair on this machine."""
    from engine import Engine, EngineError

    p = _tune_parser()
    a = p.parse_args(argv)
    sizes = ()
    if a.batch_sizes:
        try:
            sizes = opt.parse_sizes(a.batch_sizes)
        except ValueError as exc:
            p.error(f"--batch-sizes: {exc}")
    try:
        texts = read_prompts(a.prompts, a.n)
        eng = Engine.load(a.main, a.assistant, config=load_config(a))
        ids = [eng.encode(t, a.max_input_tokens, "left")[0].tolist() for t in texts]
        res = eng.calibrate(ids, a.max_new_tokens, batch_sizes=sizes)
    except (EngineError, OSError) as exc:
        print(f"stairs-tune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    for c in sorted(res["candidates"], key=lambda c: c["seconds"]):
        print(f"{c['strategy']:9s} {json.dumps(c['options']):45s} {c['speedup_vs_greedy']:.2f}x")
    print(f"auto = {res['strategy']} {res['options']} ({res['speedup_vs_greedy']:.2f}x greedy)")
    if res.get("assistant_threads"):
        print(f"assistant threads = {res['assistant_threads']} (faster than {a.threads} here)")
    if sizes:
        print("batched auto draft tokens by batch size:", res["batch_auto_k"])
    return 0


def _verify_parser() -> Parser:
    """stairs-verify's flags."""
    p = Parser(prog="stairs-verify", description=verify_main.__doc__)
    p.add_argument("folder", nargs="?", help=f"exported model folder (with {MANIFEST})")
    mode = p.add_mutually_exclusive_group()  # each replaces the folder check
    mode.add_argument(
        "--cache", nargs="?", const="", metavar="DIR",
        help="check the weights cache at DIR (default: $STAIRS_CACHE_DIR, else"
        " $XDG_CACHE_HOME/stairs, else ~/.cache/stairs) instead: exit 0 = every entry and"
        " remembered hash good, 2 = some were bad (removed) or DIR is no cache",
    )  # fmt: skip
    mode.add_argument(
        "--exact", action="store_true",
        help="instead: check on this machine that a row's logits are the same bits in every call"
        " shape (DIR's main, loaded as Engine.load does): exit 0 = all bit-identical, 2 = not",
    )  # fmt: skip
    p.add_argument("--provider", default="cpu", help="--exact: cpu, cuda, coreml or auto")
    p.add_argument(
        "--threads",
        type=opt.count_type(MAX_THREADS),
        help="--exact: ORT threads per session (default: ORT's choice)",
    )
    return p


def verify_main(argv: list[str] | None = None) -> int:
    """`stairs-verify DIR`: check every file stairs.json lists; 0 if all match, else 2.
    `stairs-verify --cache [DIR]`: hash every weights-cache entry against its entry.json and
    remove the bad ones; 0 if all were good, else 2. `stairs-verify --exact DIR`: the
    shape-invariance self-check of DIR's main on this machine (engine.selfcheck); 0 if every
    row is bit-identical, else 2."""
    p = _verify_parser()
    a = p.parse_args(argv)
    if a.exact:
        if a.folder is None:
            p.error("--exact needs a model folder")
        return _exact_main(a.folder, a.provider, a.threads)
    if a.cache is not None:
        return verify_cache_main(a.cache or None)
    if a.folder is None:
        p.error("give a model folder, or --cache [DIR]")
    return print_folder_check(a.folder)


def _exact_main(folder, provider: str = "cpu", threads: int | None = None) -> int:
    """`stairs-verify --exact DIR`: load DIR as Engine.load does by default (weights cache
    included), print every check; 0 when every row is bit-identical, else 2."""
    import onnxruntime as ort

    from .api import Engine
    from .selfcheck import passed

    try:
        eng = Engine.load(folder, provider=provider, threads=threads)
        checks = eng.self_check()
    except (EngineError, OSError) as exc:
        print(f"stairs-verify: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for c in checks:
        print(c.line())
    ok = passed(checks)
    same = sum(c.identical for c in checks)
    print(
        f"{same}/{len(checks)} call shapes bit-identical: {folder} on provider"
        f" {eng.main.provider}, onnxruntime {ort.__version__}, threads {threads or 'default'}:"
        f" {'exact here' if ok else 'NOT exact here (outputs may depend on the batch)'}"
    )
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
