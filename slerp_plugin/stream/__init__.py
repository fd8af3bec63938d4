"""Hub to Hub with bounded disk: :func:`stream_merge` reads the parents by range, merges each output
shard as its inputs arrive, uploads it at once and deletes it, and publishes everything in one commit.

- :mod:`.remote`: a Hub parent opened without downloading its weights (headers by range reads);
- :mod:`.spool`: each output shard's input bytes, fetched into spool files within a disk budget;
- :mod:`.pipeline`: the three overlapping stages (fetch, merge, upload), resume, and the final commit.
"""

from .pipeline import StreamingMerge, check_stream_spec, open_remote, stream_merge

__all__ = ["StreamingMerge", "check_stream_spec", "open_remote", "stream_merge"]
