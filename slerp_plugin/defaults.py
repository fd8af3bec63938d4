"""The defaults of a merge that other modules share, importable without torch."""

DEFAULT_DOT_THRESHOLD = 0.9995  #: FusionBench's: |cos| above it uses LERP
DEFAULT_EPSILON = 1e-8  #: FusionBench's: norms at or below it are not normalised
DEFAULT_CHUNK_ELEMENTS = 1 << 19  #: 512 Ki elements: 2 MiB of float32 scratch per operand, cache-resident
