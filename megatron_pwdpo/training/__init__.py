"""The training run: its plan (stages, resume), the loop, metrics, and the run lock."""
