"""The networks: the article's ConvDiffusionModel and the class-conditional UNet denoiser."""
