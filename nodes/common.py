"""Names shared by every node module: the menu category and the pack's custom ComfyUI types."""

CATEGORY = "analogy"

# Custom socket types. Prefixed so they never connect to another pack's look-alike type.
GEOMETRY_TYPE = "ANALOGY_GEOMETRY"
LORA_TYPE = "ANALOGY_LORA"
ANALOGY_TYPE = "ANALOGY"
BASIS_TYPE = "ANALOGY_LORA_BASIS"
