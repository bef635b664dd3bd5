"""Checkpoint I/O, shared by merging, evaluation, training and model import: Hugging Face model directories read
lazily (`read`: safetensors headers first, rows mapped or read on demand), outputs planned up front (`layout`) and
written atomically into a hidden partial directory (`write`, with `direct_io` for O_DIRECT shard writes and
`shard_hash` for the shards' sha256 as they are written), and the checks an output location must pass before
anything is written (`output_dir`). No torch at import: torch loads only where a tensor is made.
"""
