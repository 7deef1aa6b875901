//! How protobuf values are shown in tables: short enum names, endpoints,
//! ports and destinations in the words the docs use.

use cnnf_proto::v1 as pb;

use crate::timefmt::format_nanos;

/// `MODE_ALERT` → `alert`: the enum's name without its prefix, lowercase.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}

/// A mode as operators say it: `disabled`, `alert`, `prevent`.
pub fn mode(value: i32) -> String {
    pb::Mode::try_from(value)
        .map(|m| match m {
            pb::Mode::Unspecified => "disabled".to_owned(),
            other => short(other.as_str_name(), "MODE_"),
        })
        .unwrap_or_else(|_| value.to_string())
}

/// A verdict: `alert`, `prevent`, ...
pub fn verdict(value: i32) -> String {
    pb::Verdict::try_from(value)
        .map(|v| short(v.as_str_name(), "VERDICT_"))
        .unwrap_or_else(|_| value.to_string())
}

/// A protocol: `tcp`, `udp`, `icmp`, `any`.
pub fn protocol(value: i32) -> String {
    pb::Protocol::try_from(value)
        .map(|p| match p {
            pb::Protocol::Unspecified => "any".to_owned(),
            other => short(other.as_str_name(), "PROTOCOL_"),
        })
        .unwrap_or_else(|_| value.to_string())
}

/// A side: `inbound`, `outbound`.
pub fn side(value: i32) -> String {
    pb::Side::try_from(value)
        .map(|s| short(s.as_str_name(), "SIDE_"))
        .unwrap_or_else(|_| value.to_string())
}

/// A model state: `learning`, `enforcing`.
pub fn model_state(value: i32) -> String {
    pb::ModelState::try_from(value)
        .map(|s| short(s.as_str_name(), "MODEL_STATE_"))
        .unwrap_or_else(|_| value.to_string())
}

/// An identity kind: `image`, `host_app`, `network_object`, `unknown`.
pub fn identity_kind(value: i32) -> String {
    pb::IdentityKind::try_from(value)
        .map(|k| short(k.as_str_name(), "IDENTITY_KIND_"))
        .unwrap_or_else(|_| value.to_string())
}

/// An identity in a few characters: its name, else its id, else its kind.
pub fn identity(identity: Option<&pb::Identity>) -> String {
    match identity {
        Some(i) if !i.name.is_empty() => i.name.clone(),
        Some(i) if !i.id.is_empty() => i.id.clone(),
        Some(i) => identity_kind(i.kind),
        None => "unknown".to_owned(),
    }
}

/// An endpoint: `web:1 (10.0.0.1)`.
pub fn endpoint(endpoint: Option<&pb::Endpoint>) -> String {
    match endpoint {
        Some(e) => format!("{} ({})", identity(e.identity.as_ref()), e.address),
        None => "-".to_owned(),
    }
}

/// Port ranges: `5432,8000-8080`, or `any` for none.
pub fn ports(ports: &[pb::PortRange]) -> String {
    if ports.is_empty() {
        return "any".to_owned();
    }
    ports
        .iter()
        .map(|p| {
            if p.last == 0 || p.last == p.first {
                p.first.to_string()
            } else {
                format!("{}-{}", p.first, p.last)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A rule effect: `alert`, `prevent`; unspecified is `allow` for destinations.
pub fn effect(value: i32) -> String {
    match pb::RuleEffect::try_from(value) {
        Ok(pb::RuleEffect::Unspecified) => "allow".to_owned(),
        Ok(other) => short(other.as_str_name(), "RULE_EFFECT_"),
        Err(_) => value.to_string(),
    }
}

/// A destination: `db:5432/tcp`, `office:any/any=prevent`.
pub fn destination(d: &pb::RuleDestination) -> String {
    let mut text = format!("{}:{}/{}", d.object, ports(&d.ports), protocol(d.protocol));
    if d.effect != pb::RuleEffect::Unspecified as i32 {
        text.push('=');
        text.push_str(&effect(d.effect));
    }
    text
}

/// A network object's kind.
pub fn object_kind(value: i32) -> String {
    pb::network_object::Kind::try_from(value)
        .map(|k| short(k.as_str_name(), "KIND_"))
        .unwrap_or_else(|_| value.to_string())
}

/// What a network object stands for: the image ID or name, CIDRs, or unit.
pub fn object_value(o: &pb::NetworkObject) -> String {
    match pb::network_object::Kind::try_from(o.kind) {
        Ok(pb::network_object::Kind::Image) if !o.image_id.is_empty() => o.image_id.clone(),
        Ok(pb::network_object::Kind::Image) => o.image_name.clone(),
        Ok(pb::network_object::Kind::Subnet) => o.cidrs.join(","),
        Ok(pb::network_object::Kind::HostApp) => o.host_app.clone(),
        _ => String::new(),
    }
}

/// A time for tables.
pub fn time(nanos: i64) -> String {
    format_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(mode(pb::Mode::Alert as i32), "alert");
        assert_eq!(mode(0), "disabled");
        assert_eq!(verdict(pb::Verdict::Prevent as i32), "prevent");
        assert_eq!(side(pb::Side::Outbound as i32), "outbound");
        assert_eq!(protocol(pb::Protocol::Tcp as i32), "tcp");
        assert_eq!(model_state(pb::ModelState::Enforcing as i32), "enforcing");
        assert_eq!(mode(99), "99");
    }

    #[test]
    fn destinations() {
        let d = pb::RuleDestination {
            object: "db".into(),
            ports: vec![
                pb::PortRange { first: 5432, last: 0 },
                pb::PortRange {
                    first: 8000,
                    last: 8080,
                },
            ],
            protocol: pb::Protocol::Tcp as i32,
            effect: 0,
        };
        assert_eq!(destination(&d), "db:5432,8000-8080/tcp");
        let d = pb::RuleDestination {
            object: "office".into(),
            ports: vec![],
            protocol: pb::Protocol::Any as i32,
            effect: pb::RuleEffect::Prevent as i32,
        };
        assert_eq!(destination(&d), "office:any/any=prevent");
    }
}
