//! Integration tests: one binary, one module per concern, against real loopback servers and
//! the real gRPC server.
mod support;

mod body_budget;
mod cli;
mod config_example;
mod decompression;
mod durable;
mod edge;
mod egress;
mod fleet;
mod invalid;
mod limits;
mod listener;
mod operations;
mod otlp;
mod properties;
mod proto_compat;
mod proxy;
mod redirects;
mod requests;
mod retries;
mod secrets;
mod service;
mod smoke;
mod streaming;
mod timeouts;
mod timings;
mod tls;
mod verdict;
