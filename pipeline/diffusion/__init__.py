"""Masked diffusion: the ProSeCo objective and samplers."""
