"""The toy world and model: procedurally rendered, captioned images with exact ground-truth classifiers
(:mod:`safelatent.toy.world`), on which a tiny latent diffusion model is trained so that every command
runs — and every test checks behaviour — on a CPU."""
