//! The drain's cut-off as an action meets it: waits that give way to it, and the error that
//! says how far the action got (whether its request may have been sent).
use crate::action::{ActionError, ErrorKind};
use std::future::Future;
use tokio::sync::watch;

/// Where in its run the drain's cut-off found an action.
#[derive(Debug, Clone, Copy)]
pub enum ShutDownAt {
    /// Waiting to start this attempt (queued, rate-limited, or in backoff after the one before).
    Before(u32),
    /// This attempt was running: its request may have been sent.
    During(u32),
}

/// The error of an action the drain cut off. The message says whether the request may have
/// reached the upstream: a caller that sends it elsewhere must know whether it could be twice.
pub fn shut_down(at: ShutDownAt) -> ActionError {
    let message = match at {
        ShutDownAt::Before(1) => "the server shut down before any request was sent".to_owned(),
        ShutDownAt::Before(n) => format!(
            "the server shut down before attempt {n}; the request may have been sent (by attempt{} {})",
            if n > 2 { "s" } else { "" },
            if n > 2 { format!("1 to {}", n - 1) } else { "1".to_owned() }
        ),
        ShutDownAt::During(n) => {
            format!("the server shut down during attempt {n}; the request may have been sent")
        }
    };
    ActionError::new(ErrorKind::Cancelled, message)
}

/// `fut`'s output, or `None` when the drain's cut-off comes first (or came already).
pub async fn unless_cut_off<F: Future>(cut_off: &mut watch::Receiver<bool>, fut: F) -> Option<F::Output> {
    let cut = async {
        // The sender lives in the executor, which outlives every run; were it gone, no cut-off
        // could come.
        if cut_off.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    // The cut-off first: an action it finds before an attempt must not start one.
    tokio::select! {
        biased;
        () = cut => None,
        out = fut => Some(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_says_whether_the_request_may_have_been_sent() {
        let message = |at| shut_down(at).message;
        assert_eq!(message(ShutDownAt::Before(1)), "the server shut down before any request was sent");
        assert_eq!(
            message(ShutDownAt::Before(2)),
            "the server shut down before attempt 2; the request may have been sent (by attempt 1)"
        );
        assert!(message(ShutDownAt::Before(4)).ends_with("(by attempts 1 to 3)"));
        assert_eq!(
            message(ShutDownAt::During(2)),
            "the server shut down during attempt 2; the request may have been sent"
        );
        assert_eq!(shut_down(ShutDownAt::During(1)).kind, ErrorKind::Cancelled);
    }

    #[tokio::test]
    async fn a_cut_off_ends_waits_and_comes_first_once_given() {
        let (tx, mut rx) = watch::channel(false);
        assert_eq!(unless_cut_off(&mut rx, async { 7 }).await, Some(7));
        let waiting = tokio::spawn(async move {
            let out = unless_cut_off(&mut rx, std::future::pending::<()>()).await;
            (out, unless_cut_off(&mut rx, async { 7 }).await)
        });
        tx.send_replace(true);
        assert_eq!(waiting.await.unwrap(), (None, None), "a ready future loses to a cut-off already given");
    }
}
