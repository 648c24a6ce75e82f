"""Tools the assistant can call.

- `registry.py`: `Tool`, `ToolResult`, `ToolRegistry` (register a function and its JSON schema; `.schemas()`
  for the prompt; `.call()` never raises), `default_registry(workdir)` with the three tools below.
- `calculator.py`: exact arithmetic on a whitelisted `ast` (the `calculator` tool).
- `sandbox.py` (+ `sandbox_child.py`, the program the child runs): the `python` tool, code in a limited
  process; its docstring lists what each layer guards and what it does not.
- `chart.py`: the `chart` tool, matplotlib code in the same sandbox, saved as a PNG.
- `runner.py`: `generate_with_tools`, batched generation that runs the calls the model writes.

Importing this package is light (no torch): import `chatforge.tools.runner` for generation.
"""

from chatforge.tools.registry import Tool, ToolRegistry, ToolResult, default_registry

__all__ = ["Tool", "ToolRegistry", "ToolResult", "default_registry"]
