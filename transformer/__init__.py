"""The KServe transformer: decodes shoppers' photos, applies the model's own preprocessing spec, calls
the predictor, and joins listing metadata to its answer. Pillow and numpy only - no torch."""
