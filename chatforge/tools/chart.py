"""The `chart` tool: matplotlib code run in the python sandbox; the figure comes back as a PNG file.

The code runs after `import matplotlib.pyplot as plt` (Agg backend, no display); whatever figure is
current when it ends is saved as chart_NNN.png in the conversation's files folder (`workdir`), and
the result names that file. Everything the python tool's sandbox guards applies here too.
"""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path

from chatforge.tools.registry import ToolResult
from chatforge.tools.sandbox import SandboxConfig, run_python

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# importing matplotlib takes about a second of CPU: more room than plain python calls get
CHART_CONFIG = replace(SandboxConfig(), wall_s=30.0, cpu_s=20)

SCHEMA = {
    "type": "object",
    "properties": {
        "code": {
            "type": "string",
            "description": "Python that draws with matplotlib; `plt` (matplotlib.pyplot) is already imported",
        }
    },
    "required": ["code"],
    "additionalProperties": False,
}
DESCRIPTION = (
    "Draw a chart: run Python code that plots with matplotlib (plt is imported); the current figure "
    "is saved as a PNG file whose name is returned."
)

PRELUDE = "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
EPILOGUE = """
import matplotlib.pyplot as _plt
if not _plt.get_fignums():
    raise SystemExit("chart: the code drew nothing; plot with plt (plt.plot, plt.bar, ...)")
_plt.gcf().savefig({name!r}, format="png", dpi=100)
"""


def next_chart_name(workdir: Path) -> str:
    n = 1
    while (workdir / f"chart_{n:03d}.png").exists():
        n += 1
    return f"chart_{n:03d}.png"


def chart_tool(code: str, workdir: str | os.PathLike, config: SandboxConfig = CHART_CONFIG) -> ToolResult:
    """Run `code` with plt imported and save the current figure into `workdir`; the result names the PNG."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = next_chart_name(workdir)
    r = run_python(
        code, workdir=workdir, config=config, prelude=PRELUDE, epilogue=EPILOGUE.format(name=name), echo=False
    )
    files = [str(workdir / f) for f in r.files]
    png = workdir / name
    if not r.ok or name not in r.files:
        return ToolResult(content=r.text(config.shown_chars), error=True, files=files)
    head = png.read_bytes()[:24]
    if not head.startswith(PNG_MAGIC):
        return ToolResult(content=f"error: {name} is not a PNG file", error=True, files=files)
    width, height = struct.unpack(">II", head[16:24])  # the IHDR chunk
    text = f"saved the chart as {name} ({width}x{height} PNG)"
    if r.stdout.strip():
        text = r.text(config.shown_chars).replace(f"[files: {', '.join(r.files)}]", "").rstrip() + "\n" + text
    return ToolResult(content=text, files=files)
