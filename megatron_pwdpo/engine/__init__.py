"""The model at work on its processes, shared by training, the reference and evaluation:
set-up (model chunks, optimizer), micro-batches, the forward/backward step, checkpoints."""
