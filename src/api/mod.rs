//! The gRPC edge: proto ⇄ domain conversion, the service, streaming. Thin by design; proto
//! types stop here.
pub mod auth;
mod batch;
mod call;
pub mod codec;
pub mod convert;
pub mod json;
pub mod render;
pub mod reply_hold;
mod route;
mod service;
pub mod status;

pub use call::{Draining, HttpActionService};
pub use route::ActionRoutes;
pub use status::{invalid_argument, oversized_request};
