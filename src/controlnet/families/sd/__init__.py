"""The Stable Diffusion UNet families (SD1.x, SD2.x, SDXL): configs, the base model bundle, the
UNet's forward pass in halves and the UNet ControlNet of the paper (section 3.2)."""
