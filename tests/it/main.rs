//! Integration tests: one binary, one module per concern, against real loopback servers and
//! the real gRPC server.
mod support;

mod redirects;
mod retries;
mod smoke;
mod timeouts;
mod tls;
