"""Vision modalities: text-to-image diffusion policies, vision-language policies and image rewards."""
