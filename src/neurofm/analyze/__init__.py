"""Analyses and figures: reconstructions, latent similarity, probes, label efficiency."""
