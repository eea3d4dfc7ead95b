"""Front end: resolve a model spec to a PyTorch model (`model_spec`), trace it (torch.export or Dynamo) and import
the FX graph into elision's IR (`trace`, `fx_import`)."""
