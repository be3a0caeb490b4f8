"""mmalign: align text, image, vision-language and speech generative models with preferences."""

__version__ = "0.1.0"
