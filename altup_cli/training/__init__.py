"""Lightning training around the plain-PyTorch models."""
