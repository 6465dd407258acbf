"""Replay as a library: the frame-deduplicated shared-memory memory, the wire records of global replay,
and where batches come from (sources, for learners) and where transitions go (sinks, for actors).
The global replay server process is roles/replay.py."""
