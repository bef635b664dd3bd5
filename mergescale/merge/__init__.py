"""Merging expert models into one, exactly and in bounded memory: `mergescale.merge(config, out)` (mergescale.api)
runs the driver here with a runner, this process or Ray actors (mergescale.cluster.merge).

Following one tensor from disk to disk:
  inputs      open and validate the models (headers only), cut the work into units, plan the output
  driver      prepare, resume, statistics, merge pass, manifest, commit: the same for every runner
  local       the runner of this process (cluster/merge.py and cluster/worker.py: the Ray one)
  pipeline    one unit: its rows as read -> the method's kernel or torch definition -> its merged rows
  methods     each method declared once: parameters, statistics, torch definition, kernel
  kernels/    the fused CPU kernels (torch_math: the torch definitions' math)
  reader, statistics, selection, input_digests, manifest, masks: what those use
Checkpoint reading and writing is mergescale.checkpoint.

Glossary:
  unit     rows [a, b) of one tensor: the grain of reading, merging, writing, journaling and resuming
           (inputs.Unit); at most tile_mb of float32 per model
  tile     one model's rows of a unit, as stored (or the output's, as written)
  chunk    a slice of a unit's rows that the torch path computes at once, small enough to stay in cache; the
           result does not depend on it (pipeline.CHUNK_ELEMS)
  scope    what a threshold is taken over: the whole model ("*", trim_scope global) or one tensor
  stream   the values one threshold is selected from: one expert's magnitudes over one scope
  window   a range of float32 bit patterns whose values one counting pass of the exact selection histograms
           (selection.Window)
  bracket  an interval [lo, hi] that a sample of the magnitudes says holds a threshold; counting confirms it or
           the merge falls back (the first windows, one-pass TIES, held tensors)
  held     a split tensor whose per-tensor thresholds the merge pass finds itself (pipeline.HeldTensor)
"""
