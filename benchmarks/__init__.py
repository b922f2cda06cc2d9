"""The measurements behind `scripts/benchmark.py`, one module per section.

  timing      interleaved timing, the float32 matmul peak (the MFU denominator), compiled memory
  machine     what a result needs to be read: CPU, usable cores, versions, load average
  moe_layer   MoeLayer forward + backward against a dense MLP and flaxformer, over expert counts
  train_step  the library's sharded train step on 1 device and on a mesh
  generation  greedy generation with and without the KV cache
  vs_hf       the same converted model in transformers: greedy generation and an AdamW step

Every section times the variants it compares interleaved in one process (A B A B ...), so that
the ratios it reports are measured side by side: on a shared CPU absolute times move by tens of
percent between runs, the ratios much less.
"""
