"""Flax NNX modules of LSeg: ViT, DPT decoder, CLIP text tower, spatial regularisation."""
