"""The gRPC surface: the servicer (one thin method per RPC), the protobuf <-> domain converters, the
interceptor that measures every call and turns errors into statuses, TLS and bearer-token security."""
