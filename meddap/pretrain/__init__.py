"""Pretraining the `tiny` Stable Diffusion base (weights/tiny/) from scratch.

    shapes.py   the captioned domain it learns: procedural shapes and grey fields, no ultrasound
    evaluate.py the autoencoder on held-out phantoms: PSNR, channel spread, the block-mean reference
    train.py    the recipe: autoencoder, latent calibration, text encoder + UNet,
                an SD v1-layout checkpoint

`scripts/pretrain_tiny.py` runs it.
"""
