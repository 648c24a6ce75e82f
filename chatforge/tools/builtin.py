"""The registries chatforge builds from its own tools.

- `default_registry(workdir)`: calculator, python and chart, for `chatforge chat --tools`.
- `calculator_registry()`: the calculator alone, described as the world's SFT conversations show it,
  for the tool-use evaluation, RL with tools and `chatforge chat --tools calculator`.

Built here and not in registry.py so that the tools may import the registry (for `ToolResult`)
without the registry importing them back.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from chatforge.tools import calculator, chart, sandbox
from chatforge.tools.registry import ToolRegistry


def default_registry(workdir: str | Path, unsafe: bool = False) -> ToolRegistry:
    """calculator, python and chart; `workdir` is this conversation's files folder: python code
    sees the files in it, the files it writes are copied back, and charts are saved there.
    `unsafe`: run code even where the sandbox lacks its required kernel layers (`--unsafe-python`)."""
    workdir = Path(workdir)
    registry = ToolRegistry()
    registry.add(
        calculator.calculate,
        calculator.SCHEMA,
        name="calculator",
        description=calculator.DESCRIPTION,
        timeout_s=5.0,
    )
    config = sandbox.SandboxConfig(unsafe=unsafe)
    registry.add(
        lambda code: sandbox.python_tool(code, workdir, config),
        sandbox.SCHEMA,
        name="python",
        description=sandbox.DESCRIPTION,
        timeout_s=config.wall_s + 15,  # the sandbox kills the child at wall_s; this is the backstop
    )
    chart_config = replace(chart.CHART_CONFIG, unsafe=unsafe)
    registry.add(
        lambda code: chart.chart_tool(code, workdir, chart_config),
        chart.SCHEMA,
        name="chart",
        description=chart.DESCRIPTION,
        timeout_s=chart_config.wall_s + 15,
    )
    return registry


def calculator_registry() -> ToolRegistry:
    """The real calculator under the schema the SFT conversations show (`CALCULATOR_TOOL`), so the
    prompt is token for token what training showed."""
    fn = calculator.CALCULATOR_TOOL["function"]
    registry = ToolRegistry()
    registry.add(
        calculator.calculate, fn["parameters"], name=fn["name"], description=fn["description"], timeout_s=5.0
    )
    return registry
