"""Token reduction as an application: the eager executor of reduction plans, the fidelity harness, the tuner
(`elision tune`) with its deployed-ONNX timer, and VLM image-token pruning (FasterVLM, FastV)."""
