"""Developer tooling outside the pack's runtime: a headless ComfyUI driver, workflow conversion, the demo."""
