//! Who acts on an operator write.
//!
//! The operator gateway authenticates every caller and passes the caller's
//! name to the service in one header; the services record that name as the
//! actor of the change. The header's name and the rule live here so the
//! gateway that sets it and the services that read it cannot drift apart.

/// gRPC metadata (HTTP header) carrying the name of the caller the gateway
/// authenticated. The gateway always overwrites what a client sent in it.
pub const ACTOR_HEADER: &str = "x-cnnf-actor";

/// Who is acting: the caller the gateway authenticated ([`ACTOR_HEADER`])
/// wins over the name the request body claims; a caller without the
/// header is trusted with its claim. That trust is why only the gateway
/// reaches a service's API ([`crate::grpc`]: an owner-only Unix socket, or
/// mutual TLS).
pub fn acting<T>(request: &tonic::Request<T>, claimed: &str) -> String {
    request
        .metadata()
        .get(ACTOR_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or(claimed)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authenticated_caller_wins_over_the_claimed_name() {
        let mut request = tonic::Request::new(());
        assert_eq!(acting(&request, "mallory"), "mallory");
        request.metadata_mut().insert(ACTOR_HEADER, "".parse().unwrap());
        assert_eq!(acting(&request, "mallory"), "mallory");
        request.metadata_mut().insert(ACTOR_HEADER, "bob".parse().unwrap());
        assert_eq!(acting(&request, "mallory"), "bob");
    }
}
