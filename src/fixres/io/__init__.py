"""Files: atomic writes, the output-folder lock, weights-only checkpoints, the export metadata, safe CSV.

Nothing here knows a model's structure; it reads and writes bytes, JSON and tensors safely."""
