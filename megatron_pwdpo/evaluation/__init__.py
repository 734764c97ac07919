"""Held-out evaluation, the experiment (train + evaluate several arms), its report and
plots, and the statistics behind their intervals."""
