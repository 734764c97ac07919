"""The reference model: resident, offloaded, or a precomputed cache; ``precompute-ref``
writes the cache."""
