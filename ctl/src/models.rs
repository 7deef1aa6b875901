//! `models` and `learned`: queries and operator commands of `cnnf.v1.Models`.

use cnnf_proto::v1 as pb;
use pb::model_command::Command;
use tonic::Code;

use crate::cli::{LearnedCommand, ModelsCommand};
use crate::error::{CtlError, Result};
use crate::table::{pairs, Table};
use crate::{show, Ctx};

async fn list_all(ctx: &Ctx, what: &str) -> Result<Vec<pb::ModelSummary>> {
    let mut models = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = ctx
            .conn
            .models()
            .list_models(ctx.conn.request(pb::ListModelsRequest {
                page_size: 1000,
                page_token,
            }))
            .await
            .map_err(|status| CtlError::status(what, &status))?
            .into_inner();
        models.extend(page.models);
        if page.next_page_token.is_empty() {
            return Ok(models);
        }
        page_token = page.next_page_token;
    }
}

/// The model of `image`: an image ID, or an image name exactly one model has.
async fn resolve(ctx: &Ctx, image: &str, what: &str) -> Result<pb::ModelSummary> {
    let status = match ctx
        .conn
        .models()
        .get_model(ctx.conn.request(pb::GetModelRequest {
            image_id: image.to_owned(),
        }))
        .await
    {
        Ok(model) => return Ok(model.into_inner()),
        Err(status) if matches!(status.code(), Code::NotFound | Code::InvalidArgument) => status,
        Err(status) => return Err(CtlError::status(what, &status)),
    };
    let by_name: Vec<_> = list_all(ctx, what)
        .await?
        .into_iter()
        .filter(|m| m.image_name == image)
        .collect();
    match by_name.len() {
        1 => Ok(by_name.into_iter().next().expect("one model")),
        0 => Err(CtlError::status(what, &status)),
        n => Err(CtlError::bad(
            what,
            format!("{n} models have the image name {image:?}; give the image ID"),
        )),
    }
}

fn model_row(m: &pb::ModelSummary) -> Vec<String> {
    vec![
        m.image_id.clone(),
        m.image_name.clone(),
        show::model_state(m.state),
        m.container_count.to_string(),
        m.inbound_count.to_string(),
        m.outbound_count.to_string(),
        if m.state == pb::ModelState::Learning as i32 {
            show::time(m.learning_ends_unix_nanos)
        } else {
            "-".to_owned()
        },
    ]
}

const MODEL_HEADER: [&str; 7] = [
    "IMAGE",
    "NAME",
    "STATE",
    "CONTAINERS",
    "INBOUND",
    "OUTBOUND",
    "LEARNING-ENDS",
];

async fn command(ctx: &Ctx, what: String, image: &str, command: Command) -> Result<()> {
    let model = resolve(ctx, image, &what).await?;
    let event = ctx
        .conn
        .models()
        .command(ctx.conn.request(pb::ModelCommand {
            image_id: model.image_id.clone(),
            actor: String::new(),
            command: Some(command),
        }))
        .await
        .map_err(|status| CtlError::status(&what, &status))?
        .into_inner();
    ctx.emit(&event, || {
        let outcome = match &event.change {
            Some(pb::model_event::Change::Locked(_)) => "locked: the model enforces".to_owned(),
            Some(pb::model_event::Change::Extended(e)) => {
                format!("learning now ends {}", show::time(e.learning_ends_unix_nanos))
            }
            Some(pb::model_event::Change::Relearn(r)) => format!(
                "everything learned was forgotten; learning until {}",
                show::time(r.learning_ends_unix_nanos)
            ),
            Some(pb::model_event::Change::ConnectionDeleted(_)) => "learned connection deleted".to_owned(),
            _ => "done".to_owned(),
        };
        format!("{what}: {outcome} (model revision {})\n", event.revision)
    })
}

/// `cnnfctl models ...`.
pub async fn models(ctx: &Ctx, cmd: ModelsCommand) -> Result<()> {
    match cmd {
        ModelsCommand::List => {
            let models = list_all(ctx, "models list").await?;
            let response = pb::ListModelsResponse {
                models,
                next_page_token: String::new(),
            };
            ctx.emit(&response, || {
                let mut table = Table::new(MODEL_HEADER);
                for m in &response.models {
                    table.row(model_row(m));
                }
                table.render()
            })
        }
        ModelsCommand::Show { image } => {
            let model = resolve(ctx, &image, &format!("models show {image}")).await?;
            ctx.emit(&model, || {
                pairs(&[
                    ("image", model.image_id.clone()),
                    ("name", model.image_name.clone()),
                    ("state", show::model_state(model.state)),
                    ("containers", model.container_count.to_string()),
                    (
                        "namespaces",
                        if model.namespaces.is_empty() {
                            "-".to_owned()
                        } else {
                            model.namespaces.join(", ")
                        },
                    ),
                    ("inbound", model.inbound_count.to_string()),
                    ("outbound", model.outbound_count.to_string()),
                    ("learning ends", show::time(model.learning_ends_unix_nanos)),
                    ("revision", model.revision.to_string()),
                ])
            })
        }
        ModelsCommand::Lock { image } => {
            command(ctx, format!("models lock {image}"), &image, Command::LockNow(true)).await
        }
        ModelsCommand::Extend { image, by } => {
            command(
                ctx,
                format!("models extend {image}"),
                &image,
                Command::ExtendBySeconds(by),
            )
            .await
        }
        ModelsCommand::Relearn { image } => {
            command(ctx, format!("models relearn {image}"), &image, Command::Relearn(true)).await
        }
    }
}

async fn learned_all(
    ctx: &Ctx,
    what: &str,
    image_id: &str,
    side: i32,
    port: u32,
    peer_id: &str,
) -> Result<Vec<pb::LearnedConnection>> {
    let mut connections = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = ctx
            .conn
            .models()
            .list_learned_connections(ctx.conn.request(pb::ListLearnedConnectionsRequest {
                image_id: image_id.to_owned(),
                side,
                port,
                peer_id: peer_id.to_owned(),
                page_size: 1000,
                page_token,
            }))
            .await
            .map_err(|status| CtlError::status(what, &status))?
            .into_inner();
        connections.extend(page.connections);
        if page.next_page_token.is_empty() {
            return Ok(connections);
        }
        page_token = page.next_page_token;
    }
}

/// `cnnfctl learned ...`.
pub async fn learned(ctx: &Ctx, cmd: LearnedCommand) -> Result<()> {
    match cmd {
        LearnedCommand::List {
            image,
            side,
            port,
            peer,
        } => {
            let what = format!("learned list {image}");
            let model = resolve(ctx, &image, &what).await?;
            let connections = learned_all(
                ctx,
                &what,
                &model.image_id,
                side.map_or(0, |s| s.proto() as i32),
                port.map_or(0, u32::from),
                peer.as_deref().unwrap_or(""),
            )
            .await?;
            let response = pb::ListLearnedConnectionsResponse {
                connections,
                next_page_token: String::new(),
            };
            ctx.emit(&response, || {
                let mut table = Table::new([
                    "SIDE",
                    "PEER-KIND",
                    "PEER",
                    "NAME",
                    "PORT",
                    "PROTOCOL",
                    "COUNT",
                    "LAST-SEEN",
                ]);
                for c in &response.connections {
                    let peer = c.peer.clone().unwrap_or_default();
                    table.row([
                        show::side(c.side),
                        show::identity_kind(peer.kind),
                        peer.id,
                        peer.name,
                        c.port.to_string(),
                        show::protocol(c.protocol),
                        c.count.to_string(),
                        show::time(c.last_seen_unix_nanos),
                    ]);
                }
                table.render()
            })
        }
        LearnedCommand::Delete {
            image,
            peer,
            port,
            side,
            protocol,
        } => {
            let what = format!("learned delete {image}");
            let model = resolve(ctx, &image, &what).await?;
            let found: Vec<_> = learned_all(ctx, &what, &model.image_id, side.proto() as i32, u32::from(port), &peer)
                .await?
                .into_iter()
                .filter(|c| c.peer.as_ref().is_some_and(|p| p.id == peer))
                .filter(|c| protocol.is_none_or(|p| c.protocol == p.proto() as i32))
                .collect();
            let connection = match found.len() {
                0 => {
                    return Err(CtlError::not_found(
                        what,
                        format!(
                            "image {} has no learned {} connection with {peer:?} on port {port}{}",
                            model.image_id,
                            show::side(side.proto() as i32),
                            protocol.map_or(String::new(), |p| format!(
                                " protocol {}",
                                show::protocol(p.proto() as i32)
                            ))
                        ),
                    ))
                }
                1 => found.into_iter().next().expect("one connection"),
                n => {
                    return Err(CtlError::bad(
                        what,
                        format!("{n} learned connections match (several protocols or peer kinds); add --protocol"),
                    ))
                }
            };
            command(ctx, what, &model.image_id, Command::DeleteConnection(connection)).await
        }
    }
}
