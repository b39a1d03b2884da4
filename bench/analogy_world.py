"""The analogy-world yardstick: train each method's preset on the world, then measure B′ on held-out scenes of every
family (training and held-out families).

    python -m bench.analogy_world                               # every method, the full world
    python -m bench.analogy_world --methods lorweb --quick --json outputs/world.json
    python -m bench.analogy_world --seed 1 --out outputs/bench_world_s1
    python -m bench.analogy_world --methods lorweb --quick --ceilings --ceiling-families invert+hflip
    python -m bench.analogy_world --methods lorweb --quick --row-set data=world:families=invert --row-set max_steps=1200

Per family (mean absolute pixel error of B′ against the true B′, 0..1 units): the method, no edit (B′ = B), the
base backbone without the method, and the autoencoder floor (reconstruction of the true B′). Method-specific figures
go in ``extra`` (LoRWeB: ``routing_gap`` = within- minus across-family centred cosine similarity of the basis
coefficients, on training families, after training and at initialisation). Writes a table, a JSON file (the stable
interface below), and a picture grid per method (rows: families; columns A, A′, B, true B′, the method's B′). With
ceilings (default on for the full world, ``--ceilings`` with ``--quick``), a row that has one also gets per training
family the B′ of a plain LoRA of its rank budget trained on that family alone (``families.<f>.ceiling``; see
:mod:`training.world.yardstick.ceiling`).

JSON (stable): ``{"seed": int, "quick": bool, "seconds": float, "methods": {"<method>": {"families": {"<family>":
{"split": "train" | "heldout", "error": float, "no_edit": float, "base": float, "floor": float}}, "extra": {...}}}}``

The rows and the runner live in :mod:`training.world.yardstick` (one module per method); this is the command.
"""

from training.world.yardstick.runner import main

if __name__ == "__main__":
    main()
