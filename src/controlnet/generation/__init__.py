"""The generation job: a request, its checks, the denoising loop, the images and a replayable record."""
