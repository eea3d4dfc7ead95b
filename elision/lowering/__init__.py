"""Lowering of IR modules to what runs them: ONNX artifacts (`onnx_export`, with the ONNX translations of elision's
ops in `onnx_ops`), MLIR text (`mlir_export`), and the glue the CLI and the API call (`emit`)."""
