"""The speed engine: every member in one stacked network, its dropout masks, its RMSprop, bf16 and CUDA graphs.

Everything here exists for speed; ``--model.fast false`` runs torch's own modules and optimizer instead."""
