"""Stable Diffusion v1.4, written here and loaded from the original checkpoint.

  config.py            SDConfig / UNetConfig / VAEConfig / TextConfig: "sd-v1.4" and "tiny"
  unet.py              eps-prediction UNet (CompVis UNetModel names)
  vae.py               KL autoencoder (CompVis AutoencoderKL names), latent scale 0.18215
  text_encoder.py      CLIP ViT-L/14 text tower (open_clip blocks), SD v1 tokenizer, HF name map
  checkpoint.py        safe reading of .safetensors / .ckpt / diffusers folders, key checks
  diffusers_names.py   diffusers folder names -> CompVis names
  stable_diffusion.py  StableDiffusion container; load_stable_diffusion, build_stable_diffusion,
                       save_stable_diffusion
  commands.py          `meddap inspect-checkpoint`

Nothing is imported here, so `meddap --help` stays fast; import the module you need.
"""
