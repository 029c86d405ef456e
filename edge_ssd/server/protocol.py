"""The OpenAI protocol, without Starlette: request bodies to `Request`s, errors and answers to
OpenAI's JSON shapes. Everything here is a plain function of its arguments."""
from __future__ import annotations

import json
import time
from typing import Any, Optional

from ..checks import is_int
from ..errors import EdgeSSDError, MemoryBudgetError, RequestError
from ..request import Request

# OpenAI's names for Request fields where they differ (the rest are the same in both).
OPENAI_NAME = {"max_new_tokens": "max_tokens"}
# Request fields a body may set under their own names: OpenAI's, and edge-ssd's extensions.
BODY_FIELDS = ("temperature", "top_p", "seed", "stop", "top_k", "mode", "drafter", "k", "k_min", "k_max", "fanout",
               "show_sources")


class APIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_engine_error(e: EdgeSSDError, tokens_field: str = "max_tokens") -> APIError:
    """An engine error as the client should see it: a RequestError is a 400 naming its field in
    OpenAI's words (`tokens_field`: the name the body used for max_new_tokens); a
    MemoryBudgetError is a 503 (the device, not the request, is short: retry later or smaller)."""
    if isinstance(e, MemoryBudgetError):
        return APIError(503, str(e), type_="server_error", code="insufficient_memory", headers={"retry-after": "5"})
    param = getattr(e, "param", None)
    param = tokens_field if param == "max_new_tokens" else OPENAI_NAME.get(param, param)
    return APIError(400, str(e), param=param, code=getattr(e, "code", None))


def check_content_type(value: Optional[str]) -> None:
    """POST bodies must be declared JSON (`application/json`, parameters such as a charset allowed).

    A web page can send a cross-site POST without the browser asking the server first only
    when its type is text/plain, a form, or none at all; refusing those stops a page from
    driving this server from the user's browser (CORS preflights are never answered here).
    """
    media = (value or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        shown = f"{value[:100]!r}" if value else "none"
        raise APIError(415, f"the request body must be sent as Content-Type: application/json (got {shown})",
                       code="unsupported_media_type")


def parse_json(raw: bytes) -> dict:
    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", code="invalid_json")
    return body


def unsupported(body: dict) -> None:
    """OpenAI fields this server does not implement: refused unless they ask for the default."""
    if body.get("n") not in (None, 1):
        raise bad("only n = 1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise bad("only best_of = 1 is supported", param="best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name} is not supported (speculative decoding samples the model's own distribution)",
                       param=name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs are not supported", param="logprobs")
    if body.get("echo") not in (None, False):
        raise bad("echo is not supported", param="echo")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix is not supported", param="suffix")
    if body.get("logit_bias") not in (None, {}):
        raise bad("logit_bias is not supported", param="logit_bias")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and function calling are not supported", param="tools")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad("only response_format {\"type\": \"text\"} is supported", param="response_format")


# Request fields that map to engine keywords under another name, or need a type of their own.
def _max_tokens(body: dict, cap: int) -> tuple:
    """(the body's name for the token budget, its value or None), checked against the server's cap."""
    for name in ("max_completion_tokens", "max_tokens"):
        mt = body.get(name)
        if mt is None:
            continue
        if not is_int(mt):
            raise bad(f"{name} must be an integer, got {json.dumps(mt)[:60]}", param=name, code="invalid_type")
        if mt < 1:
            raise bad(f"{name} must be >= 1, got {mt}", param=name)
        if mt > cap:
            raise bad(f"{name} must be <= {cap} on this server, got {mt}", param=name)
        return name, mt
    return "max_tokens", None


def request_from_body(body: dict, base: Request, cap: int, endpoint: str) -> Request:
    """The Request a body asks for: the server's defaults (`base`), overridden by the body's fields.

    Types and ranges are the Request's own checks; its errors come back naming OpenAI's field."""
    unsupported(body)
    tokens_field, mt = _max_tokens(body, cap)
    fields: dict = {"max_new_tokens": mt if mt is not None else min(base.max_new_tokens, cap)}
    fields.update({name: body[name] for name in BODY_FIELDS if body.get(name) is not None})
    if body.get("prediction") is not None:
        fields["prediction"] = predicted_content(body["prediction"])
    if endpoint == "chat":
        fields["messages"] = chat_messages(body)
    else:
        fields["prompt"] = completion_prompt(body)
        fields["raw"] = body.get("raw", True)
    try:
        return base.with_fields(fields)
    except RequestError as e:
        raise from_engine_error(e, tokens_field) from None


def predicted_content(prediction: Any) -> str:
    """OpenAI's Predicted Outputs: {"type": "content", "content": a string or text parts}."""
    what = 'prediction must be {"type": "content", "content": a string or a list of text parts}'
    if not isinstance(prediction, dict) or prediction.get("type") != "content":
        raise bad(what, param="prediction")
    content = prediction.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(what, param="prediction")
    return content


def chat_messages(body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"message {i} must be an object with a string role", param="messages")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"message {i}: only text content parts are supported", param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise bad(f"message {i}: content must be a string or a list of text parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, list):
        raise bad("prompt must be one string (batches and token-id prompts are not supported)", param="prompt")
    if not isinstance(p, str):
        raise bad("prompt must be a string", param="prompt")
    return p


# -- answers ------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def _plain(o: Any) -> Any:
    """json.dumps fallback for numpy scalars and arrays in a stats dict."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


def finish_reason(reason: str) -> str:
    """OpenAI's finish_reason: "stop" (EOS or a stop string), else "length" (the token budget,
    the context, or the memory governor cut it short; `edge_ssd.finish_reason` says which)."""
    return "stop" if reason in ("stop", "") else "length"


def edge_ssd_field(res) -> dict:
    """The `edge_ssd` field: the engine's stats, plus its error when it ended a request early."""
    out = dict(res.stats)
    out.setdefault("finish_reason", res.finish_reason)
    if getattr(res, "error", ""):
        out["error"] = res.error
    return out


def usage(stats: dict) -> dict:
    p, c = int(stats.get("prompt_tokens", 0)), int(stats.get("new_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def choice(endpoint: str, text: Optional[str], finish: Optional[str], delta: bool, first: bool = False) -> dict:
    """One entry of `choices`: a chat message or delta, or a completion's text."""
    if endpoint == "chat":
        if delta:
            d: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
