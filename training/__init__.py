"""Training scripts of the pack (run from the repo root as ``python -m training.<script>``; no ComfyUI needed).

They import the same ``analogy_core`` classes the nodes use, so a trained file is by construction what the nodes load.
"""
