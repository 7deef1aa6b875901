//! `audits`, `replay`, `simulate`, `who-held` and `state-at`: the
//! questions `cnnf.v1.Audits` answers.

use cnnf_proto::v1 as pb;

use crate::cli::{AuditsCommand, Output, ReplayArgs, SimulateArgs, StateAtArgs, WhoHeldArgs};
use crate::error::{CtlError, Result};
use crate::table::{pairs, Table};
use crate::timefmt::now_nanos;
use crate::{show, Ctx};

const AUDIT_HEADER: [&str; 9] = [
    "FIRST-SEEN",
    "VERDICT",
    "COUNT",
    "NODE",
    "SOURCE",
    "DESTINATION",
    "PORT",
    "DECIDED-BY",
    "ID",
];

fn audit_row(a: &pb::Audit) -> Vec<String> {
    vec![
        show::time(a.first_seen_unix_nanos),
        show::verdict(a.verdict),
        a.count.to_string(),
        a.node.clone(),
        show::endpoint(a.source.as_ref()),
        show::endpoint(a.destination.as_ref()),
        format!(
            "{}/{}",
            a.destination.as_ref().map_or(0, |d| d.port),
            show::protocol(a.protocol)
        ),
        a.decided_by.clone(),
        a.audit_id.clone(),
    ]
}

fn audit_table(audits: &[pb::Audit]) -> String {
    let mut table = Table::new(AUDIT_HEADER);
    for a in audits {
        table.row(audit_row(a));
    }
    table.render()
}

/// `cnnfctl audits ...`.
pub async fn audits(ctx: &Ctx, command: AuditsCommand) -> Result<()> {
    match command {
        AuditsCommand::List {
            since,
            until,
            filter,
            limit,
            page_token,
            all,
        } => {
            let what = "audits list";
            let mut audits = Vec::new();
            let mut token = page_token.unwrap_or_default();
            let next = loop {
                let page = ctx
                    .conn
                    .audits()
                    .list_audits(ctx.conn.request(pb::ListAuditsRequest {
                        from_unix_nanos: since,
                        to_unix_nanos: until.unwrap_or(0),
                        filter: Some(filter.proto()),
                        page_size: limit,
                        page_token: token,
                    }))
                    .await
                    .map_err(|status| CtlError::status(what, &status))?
                    .into_inner();
                audits.extend(page.audits);
                if !all || page.next_page_token.is_empty() {
                    break page.next_page_token;
                }
                token = page.next_page_token;
            };
            let response = pb::ListAuditsResponse {
                audits,
                next_page_token: next,
            };
            ctx.emit(&response, || {
                let mut text = audit_table(&response.audits);
                if !response.next_page_token.is_empty() {
                    text.push_str(&format!("more: --page-token {} (or --all)\n", response.next_page_token));
                }
                text
            })
        }
        AuditsCommand::Tail { filter, count } => {
            let what = "audits tail";
            if count == Some(0) {
                return Ok(());
            }
            let mut stream = ctx
                .conn
                .audits()
                .tail(ctx.conn.request(pb::TailRequest {
                    filter: Some(filter.proto()),
                }))
                .await
                .map_err(|status| CtlError::status(what, &status))?
                .into_inner();
            let mut seen = 0u64;
            while let Some(audit) = stream
                .message()
                .await
                .map_err(|status| CtlError::status(what, &status))?
            {
                match ctx.output {
                    Output::Json => ctx.line(&serde_json::to_string(&audit).map_err(|e| ctx.json_error(e))?)?,
                    Output::Table => ctx.line(&audit_row(&audit).join("  "))?,
                }
                seen += 1;
                if count.is_some_and(|count| seen >= count) {
                    break;
                }
            }
            Ok(())
        }
    }
}

/// `cnnfctl replay`.
pub async fn replay(ctx: &Ctx, args: ReplayArgs) -> Result<()> {
    let what = "replay";
    let response = ctx
        .conn
        .audits()
        .replay(ctx.conn.request(pb::ReplayRequest {
            from_unix_nanos: args.since,
            to_unix_nanos: args.until.unwrap_or_else(now_nanos),
            lateness_seconds: 0,
            filter: Some(args.filter.proto()),
            max_audits: args.max_audits,
        }))
        .await
        .map_err(|status| CtlError::status(what, &status))?
        .into_inner();
    ctx.emit(&response, || {
        let mut text = audit_table(&response.audits);
        for incident in &response.incidents {
            text.push_str(&format!("incident: {}\n", incident.summary));
        }
        text.push_str(&format!(
            "{} audits from {} decisions in {} messages, {} .. {}{}\n",
            response.audits.len(),
            response.decisions,
            response.messages_read,
            show::time(response.from_unix_nanos),
            show::time(response.to_unix_nanos),
            if response.truncated {
                " (truncated: raise --max-audits)"
            } else {
                ""
            }
        ));
        text
    })
}

/// `cnnfctl simulate`.
pub async fn simulate(ctx: &Ctx, args: SimulateArgs) -> Result<()> {
    let what = format!("simulate --candidate {}", args.candidate.display());
    let candidate = crate::policy::read_input(&args.candidate, &what)?;
    let response = ctx
        .conn
        .audits()
        .simulate(ctx.conn.request(pb::SimulateRequest {
            candidate: None,
            candidate_json: candidate,
            from_unix_nanos: args.since,
            to_unix_nanos: args.until.unwrap_or_else(now_nanos),
            lateness_seconds: 0,
        }))
        .await
        .map_err(|status| CtlError::status(&what, &status))?
        .into_inner();
    ctx.emit(&response, || {
        let mut table = Table::new([
            "SOURCE",
            "DESTINATION",
            "PORT",
            "RECORDED",
            "SIMULATED",
            "DECIDED-BY",
            "CONNECTIONS",
            "ADDRESS-PAIRS",
        ]);
        for c in &response.changes {
            table.row([
                show::identity(c.source.as_ref()),
                show::identity(c.destination.as_ref()),
                format!("{}/{}", c.port, show::protocol(c.protocol)),
                show::verdict(c.recorded),
                show::verdict(c.simulated),
                c.simulated_decided_by.clone(),
                c.count.to_string(),
                c.address_pairs.to_string(),
            ]);
        }
        let mut text = table.render();
        text.push_str(&format!(
            "{} of {} connections would change ({} decisions evaluated)\n",
            response.connections_changed, response.connections_evaluated, response.decisions_evaluated
        ));
        text
    })
}

fn holdings_table(holdings: &[pb::AddressHolding]) -> String {
    let mut table = Table::new([
        "ADDRESS",
        "CONTAINER",
        "IMAGE",
        "NAME",
        "NODE",
        "FROM",
        "UNTIL",
        "END-REASON",
    ]);
    for h in holdings {
        let w = h.workload.clone().unwrap_or_default();
        table.row([
            h.address.clone(),
            w.container_id,
            w.image_id,
            w.image_name,
            w.node,
            show::time(h.held_from_unix_nanos),
            show::time(h.held_until_unix_nanos),
            h.end_reason.clone(),
        ]);
    }
    table.render()
}

/// `cnnfctl who-held`.
pub async fn who_held(ctx: &Ctx, args: WhoHeldArgs) -> Result<()> {
    let what = format!("who-held {}", args.address);
    let at = args.at.unwrap_or_else(now_nanos);
    let response = ctx
        .conn
        .audits()
        .who_held(ctx.conn.request(pb::WhoHeldRequest {
            address: args.address.clone(),
            at_unix_nanos: at,
        }))
        .await
        .map_err(|status| CtlError::status(&what, &status))?
        .into_inner();
    ctx.emit(&response, || {
        if response.holdings.is_empty() {
            format!("nothing held {} at {}\n", args.address, show::time(at))
        } else {
            holdings_table(&response.holdings)
        }
    })
}

/// `cnnfctl state-at`.
pub async fn state_at(ctx: &Ctx, args: StateAtArgs) -> Result<()> {
    let what = "state-at";
    let response = ctx
        .conn
        .audits()
        .state_at(ctx.conn.request(pb::StateAtRequest { at_unix_nanos: args.at }))
        .await
        .map_err(|status| CtlError::status(what, &status))?
        .into_inner();
    ctx.emit(&response, || {
        let mut text = pairs(&[
            ("at", show::time(args.at)),
            ("policy revision", response.policy_revision.to_string()),
            ("mode", show::mode(response.mode)),
            ("host mode", show::mode(response.host_mode)),
        ]);
        let mut objects = Table::new(["OBJECT", "KIND", "VALUE"]);
        for o in &response.objects {
            objects.row([o.name.clone(), show::object_kind(o.kind), show::object_value(o)]);
        }
        let mut rules = Table::new(["RULE", "SOURCE", "DESTINATIONS", "EFFECT"]);
        for r in &response.rules {
            rules.row([
                r.id.clone(),
                r.source.clone(),
                r.destinations
                    .iter()
                    .map(show::destination)
                    .collect::<Vec<_>>()
                    .join(" "),
                show::effect(r.effect),
            ]);
        }
        let mut models = Table::new(["MODEL", "NAME", "STATE", "SINCE", "LEARNED"]);
        for m in &response.models {
            models.row([
                m.image_id.clone(),
                m.image_name.clone(),
                show::model_state(m.state),
                show::time(m.state_since_unix_nanos),
                m.learned_connections.to_string(),
            ]);
        }
        for table in [objects, rules, models] {
            if !table.is_empty() {
                text.push('\n');
                text.push_str(&table.render());
            }
        }
        text
    })
}
