//! Errors of `cnnfctl` and the exit codes scripts rely on.
//!
//! Every failure is one line on stderr, `cnnfctl: <what failed>: <why>`,
//! and one exit code chosen from the kind of failure, so a script can tell
//! "not there" from "not allowed" from "try again" without parsing text.

use std::fmt;

use tonic::Code;

/// Kinds of failure, each with its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Anything else (exit 1).
    Other,
    /// Bad arguments or a request the server refused as invalid (exit 2).
    BadArgument,
    /// The object, rule, model, connection or file named does not exist (exit 3).
    NotFound,
    /// No or unknown credentials, or a role too small for the call (exit 4).
    Denied,
    /// The policy moved since it was read, the thing already exists, or the
    /// model is not in a state that allows the command (exit 5).
    Conflict,
    /// The gateway (or a service behind it) cannot be reached (exit 6).
    Unreachable,
}

impl Kind {
    /// The process exit code of this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            Kind::Other => 1,
            Kind::BadArgument => 2,
            Kind::NotFound => 3,
            Kind::Denied => 4,
            Kind::Conflict => 5,
            Kind::Unreachable => 6,
        }
    }

    /// The kind a gRPC status code stands for.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Kind::BadArgument,
            Code::NotFound => Kind::NotFound,
            Code::Unauthenticated | Code::PermissionDenied => Kind::Denied,
            Code::Aborted | Code::AlreadyExists | Code::FailedPrecondition => Kind::Conflict,
            Code::Unavailable | Code::DeadlineExceeded => Kind::Unreachable,
            _ => Kind::Other,
        }
    }
}

/// One failure of a command: what failed, why, and its kind.
#[derive(Debug, thiserror::Error)]
pub struct CtlError {
    /// Decides the exit code.
    pub kind: Kind,
    /// What failed, e.g. `rules create r-web`.
    pub what: String,
    /// Why, e.g. the server's message.
    pub why: String,
}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

impl CtlError {
    /// A failure of `kind`.
    pub fn new(kind: Kind, what: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            kind,
            what: what.into(),
            why: why.into(),
        }
    }

    /// A bad argument (exit 2).
    pub fn bad(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(Kind::BadArgument, what, why)
    }

    /// Something named does not exist (exit 3).
    pub fn not_found(what: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, what, why)
    }

    /// A failed gRPC call, classified by its status code; the server's
    /// message is the reason.
    pub fn status(what: impl Into<String>, status: &tonic::Status) -> Self {
        let kind = Kind::of_code(status.code());
        let message = status.message();
        let why = match (status.code(), message.is_empty()) {
            (Code::Unauthenticated, true) => "unauthenticated: pass a valid --token or --token-file".to_owned(),
            (Code::Unauthenticated, false) => {
                format!("{message} (unauthenticated: pass a valid --token or --token-file)")
            }
            (code, true) => format!("{code:?}"),
            (_, false) => message.to_owned(),
        };
        Self::new(kind, what, why)
    }

    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        self.kind.exit_code()
    }
}

/// Shorthand for results of `cnnfctl`.
pub type Result<T, E = CtlError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let cases = [
            (Code::InvalidArgument, 2),
            (Code::NotFound, 3),
            (Code::Unauthenticated, 4),
            (Code::PermissionDenied, 4),
            (Code::Aborted, 5),
            (Code::AlreadyExists, 5),
            (Code::FailedPrecondition, 5),
            (Code::Unavailable, 6),
            (Code::Internal, 1),
        ];
        for (code, exit) in cases {
            let error = CtlError::status("x", &tonic::Status::new(code, "m"));
            assert_eq!(error.exit_code(), exit, "{code:?}");
        }
        let error = CtlError::status("rules delete r1", &tonic::Status::not_found("no rule \"r1\""));
        assert_eq!(error.to_string(), "rules delete r1: no rule \"r1\"");
    }
}
