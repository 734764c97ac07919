"""The GPTModel and what it computes: building it (layer spec, attention, precision),
token log-probs (vocab-parallel, chunked), and memory sizing."""
