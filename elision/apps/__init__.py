"""Applications built on the compiler: `compile` (the Python API and the torch.compile backend), `specdec`
(speculative decoding), `tokens` (token pruning/merging, layer skipping and their tuner), `volume` (sparse
volume decoding of VecSet shape decoders)."""
