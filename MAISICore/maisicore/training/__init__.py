"""Training MAISI's networks: datalists, cached latents, the VAE / diffusion UNet / ControlNet
stages, resumable runs, several processes under torchrun. Entry points: ``maisi prepare`` and
``maisi train`` (``maisicore.cli``), or ``maisicore.training.run.train``."""
