//! Conveniences over the generated types: `From<Body> for Frame`, a stable
//! name per frame kind (for logs and metrics labels), and facts about error
//! codes that the server and clients share.

use crate::proto::{self, ErrorCode, Frame, frame::Body};

macro_rules! frame_from_body {
    ($($ty:ident => $variant:ident),* $(,)?) => {
        $(
            impl From<proto::$ty> for Frame {
                fn from(body: proto::$ty) -> Frame {
                    Frame { body: Some(Body::$variant(body)) }
                }
            }
        )*
    };
}

frame_from_body! {
    Auth => Auth, AuthOk => AuthOk, Ping => Ping, Pong => Pong, Send => Send,
    SendAck => SendAck, Deliver => Deliver, DeliverAck => DeliverAck, Sync => Sync,
    SyncBatch => SyncBatch, Recall => Recall, RecallAck => RecallAck, Read => Read,
    Typing => Typing, Kick => Kick, Redirect => Redirect, Error => Error,
    GroupRequest => GroupRequest, GroupReply => GroupReply, History => History,
    HistoryPage => HistoryPage,
}

impl From<Body> for Frame {
    fn from(body: Body) -> Frame {
        Frame { body: Some(body) }
    }
}

impl Body {
    /// A short, stable, lowercase name of this frame kind, for logs and metric labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Body::Auth(_) => "auth",
            Body::AuthOk(_) => "auth_ok",
            Body::Ping(_) => "ping",
            Body::Pong(_) => "pong",
            Body::Send(_) => "send",
            Body::SendAck(_) => "send_ack",
            Body::Deliver(_) => "deliver",
            Body::DeliverAck(_) => "deliver_ack",
            Body::Sync(_) => "sync",
            Body::SyncBatch(_) => "sync_batch",
            Body::Recall(_) => "recall",
            Body::RecallAck(_) => "recall_ack",
            Body::Read(_) => "read",
            Body::Typing(_) => "typing",
            Body::Kick(_) => "kick",
            Body::Redirect(_) => "redirect",
            Body::Error(_) => "error",
            Body::GroupRequest(_) => "group_request",
            Body::GroupReply(_) => "group_reply",
            Body::History(_) => "history",
            Body::HistoryPage(_) => "history_page",
        }
    }
}

impl Frame {
    /// The name of the body's kind, or `"empty"` for a frame without a body.
    pub fn kind_name(&self) -> &'static str {
        self.body.as_ref().map_or("empty", Body::kind_name)
    }

    /// An `Error` frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
        proto::Error {
            code: code as i32,
            message: message.into(),
            closing: code.is_closing(),
            ..Default::default()
        }
        .into()
    }
}

impl Frame {
    /// An `Error` frame after which the server closes the connection,
    /// whatever the code (e.g. UNAVAILABLE at login).
    pub fn closing_error(code: ErrorCode, message: impl Into<String>) -> Frame {
        proto::Error {
            code: code as i32,
            message: message.into(),
            closing: true,
            ..Default::default()
        }
        .into()
    }
}

impl ErrorCode {
    /// Whether the server closes the connection after sending this code.
    /// Codes below 20 end the connection; 20 and above fail one request.
    pub fn is_closing(self) -> bool {
        (self as i32) > 0 && (self as i32) < 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_codes_are_exactly_the_connection_level_ones() {
        assert!(ErrorCode::BadToken.is_closing());
        assert!(ErrorCode::SlowConsumer.is_closing());
        assert!(ErrorCode::BadAuth.is_closing());
        assert!(!ErrorCode::NotAMember.is_closing());
        assert!(!ErrorCode::Internal.is_closing());
        assert!(!ErrorCode::Unspecified.is_closing());
    }

    #[test]
    fn error_frame_marks_closing() {
        let Some(Body::Error(e)) = Frame::error(ErrorCode::RateLimited, "x").body else {
            panic!("not an error frame");
        };
        assert!(e.closing);
        assert_eq!(e.code(), ErrorCode::RateLimited);
    }
}
