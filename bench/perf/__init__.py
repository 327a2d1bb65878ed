"""Performance benchmarks: kernels, the engine, the server, Ray and the GPU runs (results in
bench/results/)."""
