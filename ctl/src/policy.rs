//! `mode`, `objects`, `rules` and `policy`: every write is a
//! `Policy.Apply` (or `Import`) based on the revision just read with
//! `GetPolicy`, so a write never silently overwrites someone else's.

use std::path::Path;

use cnnf_proto::v1 as pb;
use pb::policy_event::Change;

use crate::cli::{
    ActionArg, DestinationArgs, EffectArg, ExportFormat, ModeCommand, ObjectKindArgs, ObjectsCommand, PolicyCommand,
    RulesCommand,
};
use crate::error::{CtlError, Result};
use crate::table::{pairs, Table};
use crate::{show, Ctx};

/// The committed policy.
pub async fn snapshot(ctx: &Ctx) -> Result<pb::PolicySnapshot> {
    ctx.conn
        .policy()
        .get_policy(ctx.conn.request(pb::GetPolicyRequest {}))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| CtlError::status("reading the policy", &status))
}

/// Sends one change based on `expected`; prints the outcome.
async fn apply(ctx: &Ctx, what: &str, expected: u64, change: Change) -> Result<()> {
    let command = pb::PolicyCommand {
        expected_revision: expected,
        change: Some(pb::PolicyEvent {
            revision: 0,
            actor: String::new(),
            change: Some(change),
        }),
    };
    let result = ctx
        .conn
        .policy()
        .apply(ctx.conn.request(command))
        .await
        .map_err(|status| CtlError::status(what, &status))?
        .into_inner();
    print_result(ctx, what, &result)
}

fn print_result(ctx: &Ctx, what: &str, result: &pb::PolicyCommandResult) -> Result<()> {
    ctx.emit(result, || {
        let mut text = format!("{what}: done, policy revision {}\n", result.revision);
        for conflict in &result.conflicts {
            text.push_str(&format!("warning: {conflict}\n"));
        }
        text
    })
}

/// `cnnfctl mode ...`.
pub async fn mode(ctx: &Ctx, command: ModeCommand) -> Result<()> {
    match command {
        ModeCommand::Get => {
            let policy = snapshot(ctx).await?;
            let json = serde_json::json!({
                "revision": policy.revision.to_string(),
                "mode": json_of(&pb::Mode::try_from(policy.mode).unwrap_or_default())?,
                "hostMode": json_of(&pb::Mode::try_from(policy.host_mode).unwrap_or_default())?,
            });
            ctx.emit(&json, || {
                pairs(&[
                    ("mode", show::mode(policy.mode)),
                    ("host mode", show::mode(policy.host_mode)),
                    ("revision", policy.revision.to_string()),
                ])
            })
        }
        ModeCommand::Set { mode, host, revision } => {
            let expected = match revision {
                Some(revision) => revision,
                None => snapshot(ctx).await?.revision,
            };
            let which = if host { "host mode" } else { "mode" };
            let change = Change::ModeSet(pb::policy_event::ModeSet {
                mode: mode.proto() as i32,
                host,
            });
            apply(
                ctx,
                &format!("mode set {which} {}", show::mode(mode.proto() as i32)),
                expected,
                change,
            )
            .await
        }
    }
}

fn json_of<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value)
        .map_err(|error| CtlError::new(crate::error::Kind::Other, "encoding JSON", error.to_string()))
}

fn object_row(o: &pb::NetworkObject) -> Vec<String> {
    vec![
        o.name.clone(),
        show::object_kind(o.kind),
        show::object_value(o),
        o.description.clone(),
    ]
}

/// Fills `object` with the kind given on the command line; false if none was.
fn set_kind(object: &mut pb::NetworkObject, kind: &ObjectKindArgs) -> bool {
    use pb::network_object::Kind;
    let (new_kind, image_id, image_name, cidrs, host_app) = if let Some(id) = &kind.image_id {
        (Kind::Image, id.clone(), String::new(), vec![], String::new())
    } else if let Some(name) = &kind.image_name {
        (Kind::Image, String::new(), name.clone(), vec![], String::new())
    } else if !kind.cidrs.is_empty() {
        (
            Kind::Subnet,
            String::new(),
            String::new(),
            kind.cidrs.clone(),
            String::new(),
        )
    } else if let Some(unit) = &kind.host_app {
        (Kind::HostApp, String::new(), String::new(), vec![], unit.clone())
    } else {
        return false;
    };
    object.kind = new_kind as i32;
    object.image_id = image_id;
    object.image_name = image_name;
    object.cidrs = cidrs;
    object.host_app = host_app;
    true
}

/// `cnnfctl objects ...`.
pub async fn objects(ctx: &Ctx, command: ObjectsCommand) -> Result<()> {
    match command {
        ObjectsCommand::List => {
            let policy = snapshot(ctx).await?;
            let json = serde_json::json!({
                "revision": policy.revision.to_string(),
                "objects": json_of(&policy.objects)?,
            });
            ctx.emit(&json, || {
                let mut table = Table::new(["NAME", "KIND", "VALUE", "DESCRIPTION"]);
                for o in &policy.objects {
                    table.row(object_row(o));
                }
                table.render()
            })
        }
        ObjectsCommand::Show { name } => {
            let policy = snapshot(ctx).await?;
            let object = find_object(&policy, &name, &format!("objects show {name}"))?;
            ctx.emit(object, || {
                let mut table = Table::new(["NAME", "KIND", "VALUE", "DESCRIPTION"]);
                table.row(object_row(object));
                table.render()
            })
        }
        ObjectsCommand::Create {
            name,
            kind,
            description,
            revision,
        } => {
            let what = format!("objects create {name}");
            let mut object = pb::NetworkObject {
                name: name.clone(),
                description: description.unwrap_or_default(),
                ..Default::default()
            };
            if !set_kind(&mut object, &kind) {
                return Err(CtlError::bad(
                    what,
                    "say what the object is: one of --image-id, --image-name, --cidr or --host-app",
                ));
            }
            let policy = snapshot(ctx).await?;
            if policy.objects.iter().any(|o| o.name == name) {
                return Err(CtlError::new(
                    crate::error::Kind::Conflict,
                    what,
                    format!("an object named {name:?} already exists (use `objects update`)"),
                ));
            }
            let change = Change::ObjectPut(pb::policy_event::ObjectPut { object: Some(object) });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
        ObjectsCommand::Update {
            name,
            kind,
            description,
            revision,
        } => {
            let what = format!("objects update {name}");
            let policy = snapshot(ctx).await?;
            let mut object = find_object(&policy, &name, &what)?.clone();
            let kind_given = set_kind(&mut object, &kind);
            if !kind_given && description.is_none() {
                return Err(CtlError::bad(
                    what,
                    "nothing to change: give --image-id, --image-name, --cidr, --host-app or --description",
                ));
            }
            if let Some(description) = description {
                object.description = description;
            }
            let change = Change::ObjectPut(pb::policy_event::ObjectPut { object: Some(object) });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
        ObjectsCommand::Delete { name, revision } => {
            let what = format!("objects delete {name}");
            let policy = snapshot(ctx).await?;
            find_object(&policy, &name, &what)?;
            let change = Change::ObjectDeleted(pb::policy_event::ObjectDeleted { name });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
    }
}

fn find_object<'a>(policy: &'a pb::PolicySnapshot, name: &str, what: &str) -> Result<&'a pb::NetworkObject> {
    policy
        .objects
        .iter()
        .find(|o| o.name == name)
        .ok_or_else(|| CtlError::not_found(what, format!("no object named {name:?}")))
}

/// The object a rule names: by name, or by the image ID, image name or
/// unit exactly one object holds.
fn resolve_object<'a>(policy: &'a pb::PolicySnapshot, text: &str, what: &str) -> Result<&'a pb::NetworkObject> {
    if let Some(object) = policy.objects.iter().find(|o| o.name == text) {
        return Ok(object);
    }
    let matches: Vec<_> = policy
        .objects
        .iter()
        .filter(|o| {
            (!o.image_id.is_empty() && o.image_id == text)
                || (!o.image_name.is_empty() && o.image_name == text)
                || (!o.host_app.is_empty() && o.host_app == text)
        })
        .collect();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(CtlError::not_found(
            what,
            format!("no object named {text:?} (nor one holding that image or unit); create it with `cnnfctl objects create`"),
        )),
        many => Err(CtlError::bad(
            what,
            format!(
                "{text:?} is held by several objects ({}); name one",
                many.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn destinations(policy: &pb::PolicySnapshot, args: &DestinationArgs, what: &str) -> Result<Vec<pb::RuleDestination>> {
    args.to
        .iter()
        .map(|to| {
            Ok(pb::RuleDestination {
                object: resolve_object(policy, to, what)?.name.clone(),
                ports: args.ports.clone(),
                protocol: args.protocol.proto() as i32,
                effect: match args.action {
                    ActionArg::Allow => pb::RuleEffect::Unspecified,
                    ActionArg::Alert => pb::RuleEffect::Alert,
                    ActionArg::Prevent => pb::RuleEffect::Prevent,
                } as i32,
            })
        })
        .collect()
}

fn is_host_app(object: &pb::NetworkObject) -> bool {
    object.kind == pb::network_object::Kind::HostApp as i32
}

fn rule_row(r: &pb::Rule) -> Vec<String> {
    vec![
        r.id.clone(),
        r.source.clone(),
        if r.destinations.is_empty() {
            "-".to_owned()
        } else {
            r.destinations
                .iter()
                .map(show::destination)
                .collect::<Vec<_>>()
                .join(" ")
        },
        if r.allow_learned { "yes" } else { "no" }.to_owned(),
        show::effect(r.effect),
        if r.disabled { "no" } else { "yes" }.to_owned(),
        r.description.clone(),
    ]
}

const RULE_HEADER: [&str; 7] = [
    "ID",
    "SOURCE",
    "DESTINATIONS",
    "ALLOW-LEARNED",
    "EFFECT",
    "ENABLED",
    "DESCRIPTION",
];

/// `cnnfctl rules ...`.
pub async fn rules(ctx: &Ctx, command: RulesCommand) -> Result<()> {
    match command {
        RulesCommand::List => {
            let policy = snapshot(ctx).await?;
            let json = serde_json::json!({
                "revision": policy.revision.to_string(),
                "rules": json_of(&policy.rules)?,
            });
            ctx.emit(&json, || {
                let mut table = Table::new(RULE_HEADER);
                for r in &policy.rules {
                    table.row(rule_row(r));
                }
                table.render()
            })
        }
        RulesCommand::Show { id } => {
            let policy = snapshot(ctx).await?;
            let rule = find_rule(&policy, &id, &format!("rules show {id}"))?;
            ctx.emit(rule, || {
                let mut table = Table::new(RULE_HEADER);
                table.row(rule_row(rule));
                table.render()
            })
        }
        RulesCommand::Create {
            id,
            from,
            destinations: dest,
            allow_learned,
            effect,
            disabled,
            description,
            revision,
        } => {
            let id = id.unwrap_or_else(|| default_rule_id(&from, &dest));
            let what = format!("rules create {id}");
            let policy = snapshot(ctx).await?;
            if policy.rules.iter().any(|r| r.id == id) {
                return Err(CtlError::new(
                    crate::error::Kind::Conflict,
                    what,
                    format!("a rule with id {id:?} already exists (use `rules update`)"),
                ));
            }
            let source = resolve_object(&policy, &from, &what)?;
            let rule = pb::Rule {
                id,
                source: source.name.clone(),
                destinations: destinations(&policy, &dest, &what)?,
                allow_learned,
                effect: effect.proto() as i32,
                description: description.unwrap_or_default(),
                host: is_host_app(source),
                disabled,
            };
            let change = Change::RulePut(pb::policy_event::RulePut { rule: Some(rule) });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
        RulesCommand::Update {
            id,
            from,
            destinations: dest,
            allow_learned,
            effect,
            enabled,
            description,
            revision,
        } => {
            let what = format!("rules update {id}");
            let policy = snapshot(ctx).await?;
            let mut rule = find_rule(&policy, &id, &what)?.clone();
            let mut changed = false;
            if let Some(from) = from {
                let source = resolve_object(&policy, &from, &what)?;
                rule.source = source.name.clone();
                rule.host = is_host_app(source);
                changed = true;
            }
            if !dest.to.is_empty() {
                rule.destinations = destinations(&policy, &dest, &what)?;
                changed = true;
            }
            if let Some(allow) = allow_learned {
                rule.allow_learned = allow;
                changed = true;
            }
            if let Some(effect) = effect {
                rule.effect = EffectArg::proto(effect) as i32;
                changed = true;
            }
            if let Some(enabled) = enabled {
                rule.disabled = !enabled;
                changed = true;
            }
            if let Some(description) = description {
                rule.description = description;
                changed = true;
            }
            if !changed {
                return Err(CtlError::bad(
                    what,
                    "nothing to change: give --from, --to, --allow-learned, --effect, --enabled or --description",
                ));
            }
            let change = Change::RulePut(pb::policy_event::RulePut { rule: Some(rule) });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
        RulesCommand::Delete { id, revision } => {
            let what = format!("rules delete {id}");
            let policy = snapshot(ctx).await?;
            find_rule(&policy, &id, &what)?;
            let change = Change::RuleDeleted(pb::policy_event::RuleDeleted { id });
            apply(ctx, &what, revision.unwrap_or(policy.revision), change).await
        }
    }
}

fn find_rule<'a>(policy: &'a pb::PolicySnapshot, id: &str, what: &str) -> Result<&'a pb::Rule> {
    policy
        .rules
        .iter()
        .find(|r| r.id == id)
        .ok_or_else(|| CtlError::not_found(what, format!("no rule with id {id:?}")))
}

/// A readable id from a rule's parts: `web-db-5432`.
fn default_rule_id(from: &str, dest: &DestinationArgs) -> String {
    let mut id = from.to_owned();
    if let Some(to) = dest.to.first() {
        id.push('-');
        id.push_str(to);
    }
    if !dest.ports.is_empty() {
        id.push('-');
        id.push_str(&show::ports(&dest.ports).replace(',', "_"));
    }
    let id: String = id
        .chars()
        .map(|c| if c.is_control() || c == ' ' { '_' } else { c })
        .collect();
    id.chars().take(200).collect()
}

/// `cnnfctl policy ...`.
pub async fn policy(ctx: &Ctx, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Export { rule, format, out } => {
            let what = match &rule {
                Some(id) => format!("policy export --rule {id}"),
                None => "policy export".to_owned(),
            };
            let request = pb::ExportRequest {
                rule_id: rule.unwrap_or_default(),
                format: match format {
                    ExportFormat::Json => "json",
                    ExportFormat::Kubernetes => "kubernetes",
                }
                .to_owned(),
            };
            let response = ctx
                .conn
                .policy()
                .export(ctx.conn.request(request))
                .await
                .map_err(|status| CtlError::status(&what, &status))?
                .into_inner();
            match out {
                None => {
                    use std::io::Write as _;
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(&response.document)
                        .and_then(|()| stdout.flush())
                        .map_err(|error| CtlError::new(crate::error::Kind::Other, what, error.to_string()))
                }
                Some(path) => {
                    std::fs::write(&path, &response.document).map_err(|error| {
                        CtlError::new(
                            crate::error::Kind::Other,
                            &what,
                            format!("writing {}: {error}", path.display()),
                        )
                    })?;
                    let json = serde_json::json!({
                        "revision": response.revision.to_string(),
                        "file": path.display().to_string(),
                        "bytes": response.document.len(),
                    });
                    ctx.emit(&json, || {
                        format!(
                            "exported policy revision {} to {} ({} bytes)\n",
                            response.revision,
                            path.display(),
                            response.document.len()
                        )
                    })
                }
            }
        }
        PolicyCommand::Import { file, rule, revision } => {
            let what = format!("policy import {}", file.display());
            let document = read_input(&file, &what)?;
            if rule {
                let kind = serde_json::from_slice::<serde_json::Value>(&document)
                    .ok()
                    .and_then(|value| value.get("kind").and_then(|k| k.as_str()).map(str::to_owned));
                if kind.as_deref() != Some("rule") {
                    return Err(CtlError::bad(
                        what,
                        format!(
                            "--rule: the file is not a single-rule document (its \"kind\" is {}); \
                             drop --rule to import a whole policy, which replaces the current one",
                            kind.map_or_else(|| "missing".to_owned(), |k| format!("{k:?}"))
                        ),
                    ));
                }
            }
            let expected = match revision {
                Some(revision) => revision,
                None => snapshot(ctx).await?.revision,
            };
            let result = ctx
                .conn
                .policy()
                .import(ctx.conn.request(pb::ImportRequest {
                    expected_revision: expected,
                    document,
                    actor: String::new(),
                }))
                .await
                .map_err(|status| CtlError::status(&what, &status))?
                .into_inner();
            print_result(ctx, &what, &result)
        }
    }
}

/// Reads a file argument (`-` is stdin); a missing file is "not found".
pub fn read_input(path: &Path, what: &str) -> Result<Vec<u8>> {
    if path == Path::new("-") {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|error| CtlError::new(crate::error::Kind::Other, what, format!("reading stdin: {error}")))?;
        return Ok(bytes);
    }
    std::fs::read(path).map_err(|error| {
        let kind = if error.kind() == std::io::ErrorKind::NotFound {
            crate::error::Kind::NotFound
        } else {
            crate::error::Kind::Other
        };
        CtlError::new(kind, what, format!("reading {}: {error}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ProtocolArg;

    #[test]
    fn default_rule_ids_read_well() {
        let dest = DestinationArgs {
            to: vec!["db".into()],
            ports: vec![
                pb::PortRange { first: 5432, last: 0 },
                pb::PortRange { first: 1, last: 9 },
            ],
            protocol: ProtocolArg::Tcp,
            action: ActionArg::Allow,
        };
        assert_eq!(default_rule_id("web", &dest), "web-db-5432_1-9");
    }

    #[test]
    fn objects_resolve_by_name_or_by_what_they_hold() {
        let policy = pb::PolicySnapshot {
            objects: vec![
                pb::NetworkObject {
                    name: "db".into(),
                    kind: pb::network_object::Kind::Image as i32,
                    image_id: "sha256:d".into(),
                    ..Default::default()
                },
                pb::NetworkObject {
                    name: "db2".into(),
                    kind: pb::network_object::Kind::Image as i32,
                    image_name: "pg:*".into(),
                    ..Default::default()
                },
                pb::NetworkObject {
                    name: "db3".into(),
                    kind: pb::network_object::Kind::Image as i32,
                    image_name: "pg:*".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(resolve_object(&policy, "db", "x").unwrap().name, "db");
        assert_eq!(resolve_object(&policy, "sha256:d", "x").unwrap().name, "db");
        assert_eq!(resolve_object(&policy, "ghost", "x").unwrap_err().exit_code(), 3);
        assert_eq!(resolve_object(&policy, "pg:*", "x").unwrap_err().exit_code(), 2);
    }
}
