"""Pure loss math on per-row log-probs: point-wise DPO, ULMA, SFT, DPO, IPO, KTO,
unlikelihood. No processes, no model: tensors in, tensors out."""
