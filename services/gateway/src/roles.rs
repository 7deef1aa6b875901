//! The role each gRPC method needs.
//!
//! One table for the gRPC pass-through and the JSON API, so the two can
//! never disagree. Methods not in the table (added to the services later)
//! need `admin` until they are listed: a new method is never opened to
//! viewers by accident.

use cnnf_proto::v1::policy_event::Change;
use cnnf_proto::v1::PolicyCommand;

use crate::auth::Role;

/// The four services behind the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// `cnnf.v1.IdentityRegistry` (ingest).
    IdentityRegistry,
    /// `cnnf.v1.Models` (modeler).
    Models,
    /// `cnnf.v1.Policy` (policy).
    Policy,
    /// `cnnf.v1.Audits` (audit).
    Audits,
}

impl Service {
    /// The service from its short name (`Policy`) as the API paths spell it.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "IdentityRegistry" => Service::IdentityRegistry,
            "Models" => Service::Models,
            "Policy" => Service::Policy,
            "Audits" => Service::Audits,
            _ => return None,
        })
    }

    /// Splits a gRPC path `/cnnf.v1.<Service>/<Method>`.
    pub fn from_grpc_path(path: &str) -> Option<(Self, &str)> {
        let rest = path.strip_prefix("/cnnf.v1.")?;
        let (service, method) = rest.split_once('/')?;
        if method.is_empty() || method.contains('/') {
            return None;
        }
        Some((Self::from_name(service)?, method))
    }
}

/// The role a method needs, before looking at the request (see
/// [`policy_apply_role`] for `Policy/Apply`).
pub fn required_role(service: Service, method: &str) -> Role {
    match (service, method) {
        (Service::IdentityRegistry, "LookupAddress" | "AddressesOfImage") => Role::Viewer,
        (Service::Models, "ListModels" | "GetModel" | "ListLearnedConnections") => Role::Viewer,
        (Service::Models, "Command") => Role::Operator,
        (Service::Policy, "GetPolicy" | "Export") => Role::Viewer,
        (Service::Policy, "Apply") => Role::Operator,
        (Service::Policy, "Import") => Role::Admin,
        (Service::Audits, "ListAudits" | "Tail" | "Replay" | "WhoHeld" | "StateAt" | "Simulate") => Role::Viewer,
        _ => Role::Admin,
    }
}

/// The role a `Policy/Apply` command needs: `admin` for a mode change (and
/// for a whole-policy `imported` change), `operator` for objects and rules.
pub fn policy_apply_role(command: &PolicyCommand) -> Role {
    match command.change.as_ref().and_then(|event| event.change.as_ref()) {
        Some(Change::ModeSet(_) | Change::Imported(_)) => Role::Admin,
        _ => Role::Operator,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnnf_proto::v1::{policy_event, PolicyEvent};

    #[test]
    fn paths_and_roles() {
        assert_eq!(
            Service::from_grpc_path("/cnnf.v1.Audits/Tail"),
            Some((Service::Audits, "Tail"))
        );
        assert_eq!(Service::from_grpc_path("/cnnf.v1.Other/Tail"), None);
        assert_eq!(Service::from_grpc_path("/cnnf.v1.Audits/"), None);
        assert_eq!(required_role(Service::Audits, "Tail"), Role::Viewer);
        assert_eq!(required_role(Service::Models, "Command"), Role::Operator);
        assert_eq!(required_role(Service::Policy, "Import"), Role::Admin);
        assert_eq!(required_role(Service::Policy, "SomethingNew"), Role::Admin);
        let mode = PolicyCommand {
            expected_revision: 1,
            change: Some(PolicyEvent {
                change: Some(policy_event::Change::ModeSet(policy_event::ModeSet {
                    mode: 3,
                    host: false,
                })),
                ..Default::default()
            }),
        };
        assert_eq!(policy_apply_role(&mode), Role::Admin);
        let rule = PolicyCommand {
            expected_revision: 1,
            change: Some(PolicyEvent {
                change: Some(policy_event::Change::RuleDeleted(policy_event::RuleDeleted {
                    id: "r".into(),
                })),
                ..Default::default()
            }),
        };
        assert_eq!(policy_apply_role(&rule), Role::Operator);
    }
}
