"""The request schema of POST /v1/completions and its checks (ApiError 400)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ApiError

MAX_PROMPTS = 64  # prompts in one request (each is one scheduler request)
MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions request. Unknown fields and wrong types are refused (400); the
    sampling fields are accepted only at their greedy values."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool = False
    suffix: str | None = None
    seed: int | None = None  # greedy is deterministic: any seed gives the same text
    user: str | None = None


FIELD_TYPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string, a list of strings or null",
}


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """(message, field) of the first problem pydantic found, naming the field."""
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {err.get('msg', '')}", None
    if not loc:
        return f"the body must be a JSON object ({err.get('msg', '')})", None
    name = loc[0]
    if kind == "extra_forbidden":
        return f"unknown field {'.'.join(loc)!r}", name
    if kind == "missing":
        return f"field {'.'.join(loc)!r} is required", name
    if name in FIELD_TYPES:
        return f"field {name!r} must be {FIELD_TYPES[name]}", name
    return f"field {'.'.join(loc)!r}: {err.get('msg', 'bad value')}", name


def greedy_only(req: CompletionRequest) -> None:
    """400 for anything but greedy decoding of one completion per prompt."""
    neutral = {
        "temperature": (None, 0),
        "top_p": (None, 1),
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "best_of": (None, 1),
        "logprobs": (None,),
        "suffix": (None,),
    }
    for name, ok in neutral.items():
        v = getattr(req, name)
        if v not in ok:
            allowed = " or ".join("absent" if x is None else repr(x) for x in ok)
            raise ApiError(
                400,
                f"only greedy decoding is served (token-exact to the main model): {name} must be "
                f"{allowed}, not {v!r}",
                name,
            )
    if req.n != 1:
        raise ApiError(400, f"only greedy decoding is served: n must be 1, not {req.n}", "n")
    if req.echo:
        raise ApiError(400, "echo is not supported", "echo")
    if req.logit_bias:
        raise ApiError(
            400, "only greedy decoding is served: logit_bias must be empty", "logit_bias"
        )


def stops_of(req: CompletionRequest) -> list[str]:
    """The request's stop strings, checked (400)."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop has {len(stops)} strings; at most {MAX_STOPS}", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ApiError(
                400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters", "stop"
            )
    return stops
