"""Training data shared by every trainer: one registry of sources (:mod:`.sources`), the readers behind them
(:mod:`.analogies`, :mod:`.pairs`, :mod:`.synthetic`), image decoding and its errors (:mod:`.readers`), and skipping
and batching (:mod:`.batching`)."""
