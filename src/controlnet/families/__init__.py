"""Base-model families: what a locked text-to-image model is (its networks, text encoders, VAE and
noise schedule) and the ControlNet that fits it. Each family lives in a folder of its own."""
