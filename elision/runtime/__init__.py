"""elision runtime: executors for compiled artifacts (speculative decoding lives in `elision.apps.specdec`).

Kept import-light on purpose: nothing here imports torch or transformers.
"""
