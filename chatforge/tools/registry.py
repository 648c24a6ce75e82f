"""Tools the assistant can call: a `Tool` is a Python function plus the JSON schema of its arguments.

    registry = ToolRegistry()
    registry.add(calculate, CALC_SCHEMA, name="calculator", description="Exact arithmetic.")
    registry.schemas()                      # the OpenAI `tools` list, for render_prompt(..., tools=)
    registry.call("calculator", '{"expression": "2**10"}')   # -> ToolResult(content="1024")

`call` never raises: an unknown tool, arguments that are not JSON or do not match the schema, a
tool that raises or runs past its time limit all come back as `ToolResult(error=True)` whose
`content` ("error: ...") is what the model reads next, so it can correct itself.

Argument checking is a small hand-written JSON-schema validator (the subset tool schemas use:
type, properties, required, additionalProperties, enum, items, min/max, minLength/maxLength,
minItems/maxItems); it needs no dependency and its messages are short enough for a model.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatforge.errors import ChatforgeError

MAX_RESULT_CHARS = 8000  # what one tool result may put in front of the model
DEFAULT_TIMEOUT_S = 30.0
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolResult:
    content: str  # what the model sees in the tool message
    error: bool = False
    files: list[str] = field(default_factory=list)  # paths of files the tool wrote (e.g. a chart PNG)


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    function: Callable[..., str | ToolResult]  # called with the arguments as keywords
    timeout_s: float = DEFAULT_TIMEOUT_S

    def schema(self) -> dict:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


def error_result(message: str) -> ToolResult:
    return ToolResult(content=f"error: {message}", error=True)


class ToolRegistry:
    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}

    def add(
        self,
        function: Callable[..., str | ToolResult],
        parameters: dict,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> Tool:
        """Register `function` under `name` (default: its __name__) with the JSON schema of its arguments;
        the description defaults to the first paragraph of its docstring."""
        name = name or function.__name__
        if not _NAME.match(name):
            raise ChatforgeError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
        if name in self.tools:
            raise ChatforgeError(f"a tool named {name!r} is already registered")
        description = description or (function.__doc__ or "").strip().split("\n\n")[0].strip()
        if not description:
            raise ChatforgeError(
                f"tool {name!r} needs a description (pass one, or give the function a docstring)"
            )
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise ChatforgeError(f'tool {name!r}: parameters must be a JSON schema with "type": "object"')
        if not timeout_s > 0:
            raise ChatforgeError(f"tool {name!r}: timeout_s must be > 0, got {timeout_s}")
        tool = Tool(name, " ".join(description.split()), parameters, function, timeout_s)
        self.tools[name] = tool
        return tool

    def tool(self, parameters: dict, **kw: Any) -> Callable:
        """Decorator form of `add`: @registry.tool({"type": "object", ...})."""

        def register(function: Callable) -> Callable:
            self.add(function, parameters, **kw)
            return function

        return register

    def schemas(self) -> list[dict]:
        """The OpenAI `tools` list: [{"type": "function", "function": {name, description, parameters}}]."""
        return [t.schema() for t in self.tools.values()]

    def names(self) -> list[str]:
        return list(self.tools)

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Run one tool call; every failure is an error ToolResult, never an exception."""
        tool = self.tools.get(name) if isinstance(name, str) else None
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return error_result(f"unknown tool {name!r}; the tools are: {known}")
        if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return error_result(f"the arguments are not valid JSON ({e.msg} at character {e.pos})")
        problem = check_arguments(tool.parameters, arguments)
        if problem:
            return error_result(f"bad arguments for {name}: {problem}")
        result = _run_with_timeout(tool, arguments)
        if len(result.content) > MAX_RESULT_CHARS:
            cut = len(result.content) - MAX_RESULT_CHARS
            result.content = result.content[:MAX_RESULT_CHARS] + f"\n[... {cut:,} more characters cut]"
        return result


def _run_with_timeout(tool: Tool, arguments: dict) -> ToolResult:
    """Call the tool in a worker thread and wait at most its timeout. A Python thread cannot be
    killed: one that overruns is abandoned (daemon) and keeps running; tools that can hang should
    bound themselves (the python and chart tools kill their own child process first)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = tool.function(**arguments)
        except ChatforgeError as e:  # a tool's way of saying "bad input": the message is for the model
            box["value"] = error_result(str(e))
        except Exception as e:  # a bug or an unexpected failure inside the tool: short, no traceback
            box["value"] = error_result(f"{tool.name} failed: {type(e).__name__}: {e}")

    worker = threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(tool.timeout_s)
    if worker.is_alive():
        return error_result(f"{tool.name} did not finish within {tool.timeout_s:g} s")
    value = box.get("value")
    if isinstance(value, ToolResult):
        return value
    if isinstance(value, str):
        return ToolResult(content=value)
    return ToolResult(content=json.dumps(value, ensure_ascii=False, default=str))


# ---- JSON schema subset ------------------------------------------------------------------------
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}.get(
        type(v), type(v).__name__
    )


def check_arguments(schema: dict, value: Any, path: str = "arguments") -> str | None:
    """The first way `value` breaks `schema` (a short message naming the place), or None if it fits."""
    if not isinstance(schema, dict):
        return None
    types = schema.get("type")
    if types is not None:
        allowed = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES.get(t, lambda v: False)(value) for t in allowed):
            return f"{path} must be {' or '.join(allowed)}, got {_json_type(value)}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path} must be one of {json.dumps(schema['enum'])}, got {json.dumps(value, default=str)}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return f"{path} must have at least {schema['minLength']} characters"
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path} must have at most {schema['maxLength']} characters, got {len(value)}"
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return f"{path} must be >= {schema['minimum']}, got {value}"
        if "maximum" in schema and value > schema["maximum"]:
            return f"{path} must be <= {schema['maximum']}, got {value}"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            return f"{path} must have at least {schema['minItems']} items"
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{path} must have at most {schema['maxItems']} items, got {len(value)}"
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                if problem := check_arguments(schema["items"], item, f"{path}[{i}]"):
                    return problem
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key in schema.get("required") or []:
            if key not in value:
                return f"{path} is missing the required field {key!r}"
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                if problem := check_arguments(props[key], item, f"{path}.{key}"):
                    return problem
            elif extra is False:
                return f"{path} has an unknown field {key!r}; allowed: {', '.join(props) or 'none'}"
            elif isinstance(extra, dict):
                if problem := check_arguments(extra, item, f"{path}.{key}"):
                    return problem
    return None
