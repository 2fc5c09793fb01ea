//! Call-level failures as gRPC statuses: an invalid action is INVALID_ARGUMENT carrying
//! google.rpc.BadRequest with one field violation per problem.
use crate::action::InvalidAction;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub fn invalid_argument(invalid: &InvalidAction) -> Status {
    let mut details = ErrorDetails::new();
    for v in &invalid.violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    Status::with_error_details(Code::InvalidArgument, invalid.to_string(), details)
}
