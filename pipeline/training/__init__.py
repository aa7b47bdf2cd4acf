"""Training the tiny model shipped with longreel (jobs/train_tiny.py, docs/training.md).

data.py: procedural training videos planned on the CPU and drawn on the device; text.py: byte
tokenizer and UMT5 encoder in plain torch (the GPU machine has no transformers); vae.py: the VAE's
objective and latent moments; attention.py: masked-dense training equivalents of sparse methods;
twin.py: one DiT (adapter, text encoder, optimiser, EMA) per attention method; trainer.py: the
stages, checkpoints and export; validate.py: sampling with the pipeline's sampler; install.py: the
weights into the package.
"""
