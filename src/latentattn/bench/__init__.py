"""Benchmarks that write JSON and plots: decode-step timings (``decode``), DSA against dense MLA
(``dsa``) and the indexer warm-up on real text (``indexer``). The calculators they report beside
their timings live in :mod:`latentattn.calc`, the timing helpers in :mod:`latentattn.timing`."""
