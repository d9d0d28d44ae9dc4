"""The KServe v2 gRPC messages: ``kserve_v2_grpc.proto`` and the Python protoc made of it
(``scripts/gen_grpc_proto``; committed, so that the daemon never needs the generator)."""
