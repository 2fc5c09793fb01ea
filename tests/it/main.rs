//! Integration tests: one binary, one module per concern, against real loopback servers and
//! the real gRPC server.
mod pg;
mod support;

mod body_budget;
mod cli;
mod conditions;
mod config_example;
mod decompression;
mod durable;
mod durable_pg;
mod edge;
mod egress;
mod extract;
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
mod reply_body;
mod requests;
mod retries;
mod secrets;
mod service;
mod smoke;
mod streaming;
mod tenants;
mod timeouts;
mod timings;
mod tls;
mod vars;
mod verdict;
