"""Resumable batch jobs: valuing into result files, shards, and the identity of a job."""
