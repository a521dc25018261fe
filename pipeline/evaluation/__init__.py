"""Batch evaluation: checkpoints x tasks x sampler settings -> result files -> report."""
