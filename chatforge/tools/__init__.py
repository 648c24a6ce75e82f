"""Tools the assistant can call.

- `registry.py`: `Tool`, `ToolResult`, `ToolRegistry` (register a function and its JSON schema; `.schemas()`
  for the prompt; `.call()` never raises).
- `builtin.py`: the registries built from the tools below: `default_registry(workdir)` (all three) and
  `calculator_registry()` (the calculator as the SFT conversations show it).
- `calculator.py`: exact arithmetic on a whitelisted `ast` (the `calculator` tool).
- `sandbox.py` (+ `sandbox_child.py`, the program the child runs): the `python` tool, code in a limited
  process; its docstring lists what each layer guards and what it does not.
- `chart.py`: the `chart` tool, matplotlib code in the same sandbox, saved as a PNG.
- `runner.py`: `generate_with_tools`, batched generation that runs the calls the model writes.

Importing this package imports nothing: take each piece from its module (`runner` pulls in torch).
"""
