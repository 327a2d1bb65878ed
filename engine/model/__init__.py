"""The resident model: loading and its checks, the embedded default, the skip readout, packed attention."""
