"""The gRPC server: the service, its calls, authentication and the metrics endpoint."""
