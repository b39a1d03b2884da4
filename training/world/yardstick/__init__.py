"""The analogy-world yardstick: one row per method (``lorweb``, ``loc``, ``edit_transfer``, ``regions``), the shared
row interface (:mod:`.common`) and the runner behind ``python -m bench.analogy_world`` (:mod:`.runner`)."""
