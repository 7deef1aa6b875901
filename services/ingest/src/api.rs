//! The `cnnf.v1.IdentityRegistry` gRPC API: point-in-time questions
//! answered from the registry's committed state.
//!
//! - `LookupAddress(address, at)`: the holdings that covered `at`
//!   (`from <= at < until`); the earliest is `workload`, the others are
//!   `conflicting`. `at` 0 means now.
//! - `AddressesOfImage(image, from, until)`: every holding of the image
//!   that overlaps `[from, until]`; `until` 0 means now.
//!
//! Bad arguments are `INVALID_ARGUMENT` with a message naming the field.

use std::sync::Arc;

use cnnf_proto::v1::identity_registry_server::IdentityRegistry;
use cnnf_proto::v1::{AddressesOfImageRequest, AddressesOfImageResponse, LookupAddressRequest, LookupAddressResponse};
use cnnf_store::ProjectionStore;
use tonic::{Request, Response, Status};

use crate::address;
use crate::liveness::now_nanos;
use crate::registry::{self, QueryError};

/// Most holdings one `AddressesOfImage` answer may carry.
pub const MAX_HOLDINGS: usize = 100_000;

/// The API over the ingest store.
pub struct RegistryApi {
    store: Arc<dyn ProjectionStore>,
}

impl RegistryApi {
    /// An API answering from `store`.
    pub fn new(store: Arc<dyn ProjectionStore>) -> Self {
        Self { store }
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    tracing::error!(message = "Registry query failed.", %error);
    Status::internal(format!("registry: {error}"))
}

fn instant(field: &str, value: i64) -> Result<i64, Status> {
    match value {
        0 => Ok(now_nanos()),
        value if value < 0 => Err(Status::invalid_argument(format!(
            "{field}: {value} is before 1970; give Unix nanoseconds, or 0 for now"
        ))),
        value => Ok(value),
    }
}

#[tonic::async_trait]
impl IdentityRegistry for RegistryApi {
    async fn lookup_address(
        &self,
        request: Request<LookupAddressRequest>,
    ) -> Result<Response<LookupAddressResponse>, Status> {
        let request = request.into_inner();
        let address = address::canonical(&request.address)
            .map_err(|error| Status::invalid_argument(format!("address: {error}")))?;
        let at = instant("at_unix_nanos", request.at_unix_nanos)?;
        let store = Arc::clone(&self.store);
        let holdings = tokio::task::spawn_blocking(move || registry::holdings_at(store.as_ref(), &address, at))
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let holdings = holdings
            .iter()
            .map(registry::StoredHolding::to_api)
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        let mut response = LookupAddressResponse::default();
        if let Some((first, others)) = holdings.split_first() {
            response.workload = first.workload.clone();
            response.held_from_unix_nanos = first.held_from_unix_nanos;
            response.held_until_unix_nanos = first.held_until_unix_nanos;
            response.conflicting = others.iter().filter_map(|holding| holding.workload.clone()).collect();
        }
        response.holdings = holdings;
        Ok(Response::new(response))
    }

    async fn addresses_of_image(
        &self,
        request: Request<AddressesOfImageRequest>,
    ) -> Result<Response<AddressesOfImageResponse>, Status> {
        let request = request.into_inner();
        if request.image_id.is_empty() {
            return Err(Status::invalid_argument("image_id: required"));
        }
        if request.from_unix_nanos < 0 {
            return Err(Status::invalid_argument(format!(
                "from_unix_nanos: {} is before 1970",
                request.from_unix_nanos
            )));
        }
        let until = instant("until_unix_nanos", request.until_unix_nanos)?;
        let from = request.from_unix_nanos;
        if from > until {
            return Err(Status::invalid_argument(format!(
                "from_unix_nanos: {from} is after until_unix_nanos {until}"
            )));
        }
        let store = Arc::clone(&self.store);
        let image_id = request.image_id;
        let holdings = tokio::task::spawn_blocking(move || {
            registry::holdings_of_image(store.as_ref(), &image_id, from, until, MAX_HOLDINGS)
        })
        .await
        .map_err(internal)?
        .map_err(|error| match error {
            QueryError::TooMany { .. } => {
                Status::resource_exhausted(format!("from_unix_nanos..until_unix_nanos: {error}"))
            }
            QueryError::Store(error) => internal(error),
        })?;
        let holdings = holdings
            .iter()
            .map(registry::StoredHolding::to_api)
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        Ok(Response::new(AddressesOfImageResponse { holdings }))
    }
}
