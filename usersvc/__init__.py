"""usersvc: user management over gRPC."""
