"""The array-library-agnostic core of speculative decoding: token trees, tree builders, model-free drafters,
greedy verification, lossless sampling (logits processing and rejection sampling, in numpy) and the per-step
bookkeeping.

Nothing in this package imports torch: it is shared by the torch runtime (`elision.apps.specdec`) and the
deploy-time onnxruntime loop (`elision.runtime.generation.ort_generator`), which must run where only numpy, onnxruntime and
tokenizers are installed.
"""
