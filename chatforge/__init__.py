"""chatforge: build your own ChatGPT end to end, one readable stage per file."""

__version__ = "0.1.0"
