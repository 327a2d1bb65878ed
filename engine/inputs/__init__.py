"""Samples in: their forms and label rules, chat templates, images, and the readers of sample files."""
