"""Red-teaming your own model: probes (attacks), detectors (did it work), defenses, and the harness.

- `goals.py`: what an attack asks for (the world's disallowed requests, AdvBench, a goal file).
- `probes.py`: `PROBES`, name -> Probe: role-play, encodings, indirect injection through a document.
- `detectors.py`: `DETECTORS`, name -> function(answer, attack) -> bool (the attack succeeded).
- `defenses.py`: `DEFENSES`, name -> Defense, stacked in a `DefenseStack`: the one place chat,
  serve, the tool runner and this harness pass messages in and answers out through.
- `harness.py` + `command.py`: `chatforge redteam`: probes x goals through the engine, ASR per probe x detector.
- `gcg.py`: GCG adversarial suffixes; `perplexity.py`: the windowed perplexity filter against them.
"""
