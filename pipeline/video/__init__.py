"""Video out: streaming causal VAE decode (decode.py), fragmented-MP4 encode (encode.py), and the
writer that streams both into an object store (writer.py). Import from the modules: decode.py
pulls in diffusers, which encoding alone does not need."""
