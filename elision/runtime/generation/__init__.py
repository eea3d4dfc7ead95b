"""The array-library-agnostic core of speculative decoding: token trees, tree builders, model-free drafters,
greedy verification, lossless sampling (logits processing and rejection sampling, in numpy), the per-step
bookkeeping, and the draft -> verify -> accept -> commit loop itself (`loop.decode`) over a `TreeSession`.

Sessions: the torch `KVSession` (`elision.apps.specdec.session`) and the ONNX Runtime ones here
(`ort_step_session`: GroupQueryAttention over KV buffers written in place; `ort_verify_session`: the older
concatenating graph form), driven by `ort_generator.OrtGenerator` with the per-machine `calibration`.

Nothing in this package imports torch: it is shared by the torch runtime (`elision.apps.specdec`) and the
deploy-time onnxruntime loop, which must run where only numpy, onnxruntime and tokenizers are installed.
"""
