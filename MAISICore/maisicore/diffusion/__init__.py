"""Diffusion: noise schedules, the sampling loop and the network conditioning shared by inference and training."""
