//! The CNNF modeler service: one model per image: learning, locking, and every model change on the log.
//!
//! A library with [`run`] so that tests and the all-in-one binary decide
//! when it stops; `main.rs` is only the process around it. At this stage
//! the service declares the streams, buckets and consumers it relies on
//! and reports ready; its projection arrives with its own issue.
//!
//! Must never depend on the node agent or on another service.

#![forbid(unsafe_code)]

use std::future::Future;

use cnnf_service::{CommonConfig, Health};

/// The service's name: NATS connection name, logs, metrics.
pub const NAME: &str = "cnnf-modeler";

/// Default address of `/metrics` and `/ready`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:9102";

/// Configuration of the modeler service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "cnnf-modeler",
    version,
    about = "CNNF modeler service: one model per image: learning, locking, and every model change on the log"
)]
pub struct Config {
    /// Settings every service shares.
    #[command(flatten)]
    pub common: CommonConfig,
}

/// Runs the service until `shutdown` completes.
pub async fn run(config: Config, health: Health, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let ready = health.component(NAME);
    let _js = cnnf_service::connect_and_ensure(NAME, &config.common).await?;
    ready.set(true);
    tracing::info!(message = "Service ready.", service = NAME, cluster = %config.common.cluster);
    shutdown.await;
    tracing::info!(message = "Service stopped.", service = NAME);
    Ok(())
}
