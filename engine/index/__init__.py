"""The index: a pool's stored gradients, valued once and queried for any target."""
