"""Tool calling: tools into the prompt, tool calls out of the model's text.

Rendering: the chat template gets the request's `tools` (its `tools` variable, as transformers
passes them). A template that never mentions `tools` (SmolLM2's and Gemma 3's GGUF templates
do not) gets them the way Hermes / Qwen templates write them: a system message listing the
function signatures in <tools></tools> and asking for <tool_call>{"name": ..., "arguments":
...}</tool_call>. Earlier assistant tool calls and tool results are written in the same tags.

Parsing (`parse_tool_calls`) understands the families' styles: Hermes / Qwen
`<tool_call>{json}</tool_call>` blocks, and Llama 3's bare JSON object `{"name": ...,
"parameters": ...}` (optionally after `<|python_tag|>`), "arguments" or "parameters" either.

`tool_choice` "required" or a named function constrains the output (serving.structured) to
the JSON schema `call_schema` gives, so the arguments always parse.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def template_renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def tools_system_prompt(tools: list[dict]) -> str:
    """The Hermes / Qwen tools preamble, for templates that do not render `tools`."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def messages_for_template(messages: list[dict], tools: list[dict] | None,
                          chat_template: str | None) -> list[dict]:
    """Messages a template without tool support can render: tools as a system preamble,
    assistant tool calls and tool results as text in Hermes tags. Templates that render
    `tools` get the messages unchanged."""
    if template_renders_tools(chat_template):
        return messages
    out = []
    for message in messages:
        content = message.get("content") or ""
        if message.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                              "arguments": _arguments(c["function"])},
                                             ensure_ascii=False) + "\n</tool_call>"
                for c in message["tool_calls"])
            content = f"{content}\n{calls}".strip()
        if message["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{content}\n</tool_response>"})
            continue
        out.append({"role": message["role"], "content": content})
    if tools:
        preamble = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _arguments(function: dict) -> Any:
    arguments = function.get("arguments", "{}")
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def parse_tool_calls(text: str, names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(content left over or None, OpenAI tool_calls) from model text; calls to functions
    outside `names` (when given) or whose JSON does not parse are left in the content."""
    calls, kept = [], text
    blocks = _HERMES_CALL.findall(text) if "<tool_call>" in text else []
    if blocks:
        kept = text[: text.index("<tool_call>")]
    else:
        stripped = text.strip().removeprefix("<|python_tag|>").strip()
        blocks = [stripped] if stripped.startswith("{") else []
        kept = "" if blocks else text
    for block in blocks:
        call = _call(block, names)
        if call is None:
            return text, []  # not (all) tool calls: the text stays content
        calls.append(call)
    content = kept.strip() or None
    return (content, calls) if calls else (text, [])


def _call(block: str, names: set[str] | None) -> dict | None:
    try:
        data = json.loads(block)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    if names is not None and data["name"] not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"],
                         "arguments": json.dumps(arguments, ensure_ascii=False)}}


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call ({"name", "arguments"}) to `name`, or to any of `tools`."""
    options = [{
        "type": "object",
        "properties": {"name": {"const": t["function"]["name"]},
                       "arguments": t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in tools if name is None or t["function"]["name"] == name]
    return options[0] if len(options) == 1 else {"anyOf": options}
