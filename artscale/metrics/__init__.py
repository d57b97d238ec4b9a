"""Sample quality: FID and KID against real images, for `artscale eval` and training alike."""
