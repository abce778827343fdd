"""Dataset work on Ray: distributing the pipeline's per-shard functions (prepare, audit)."""
