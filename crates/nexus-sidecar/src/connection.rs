//! Which connection a route uses: its id, or the workspace's connection to
//! a provider, looked up through the gateway and kept for a minute (a
//! reconnect that made a new connection is picked up by the next lookup).
//! A failed lookup is kept for a few seconds: an agent looping on a route
//! whose workspace has no connection costs the gateway one lookup per
//! [`FAILURE_TTL`], not one per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_bridge::{Bridge, BridgeError};

use crate::routes::{ConnectionRef, Route};

/// How long a looked-up connection is kept.
pub const LOOKUP_TTL: Duration = Duration::from_secs(60);
/// How long a failed lookup is kept.
pub const FAILURE_TTL: Duration = Duration::from_secs(5);

type Found = (Result<Arc<str>, BridgeError>, Instant);

/// Looked-up connections by route.
#[derive(Debug, Default)]
pub struct Resolver {
    found: Mutex<HashMap<String, Found>>,
}

impl Resolver {
    /// The connection id of `route`.
    pub async fn connection(
        &self,
        bridge: &Bridge,
        route: &Route,
    ) -> Result<Arc<str>, BridgeError> {
        let (workspace, provider) = match &route.connection {
            ConnectionRef::Id(id) => return Ok(Arc::from(id.as_str())),
            ConnectionRef::Lookup {
                workspace,
                provider,
            } => (workspace, provider),
        };
        if let Some((found, at)) = self.lock().get(&route.name) {
            let ttl = if found.is_ok() {
                LOOKUP_TTL
            } else {
                FAILURE_TTL
            };
            if at.elapsed() < ttl {
                return found.clone();
            }
        }
        // Boxed: a gateway call is a large future, and every request's
        // future would carry it otherwise (routes by id never make one).
        let found = Box::pin(bridge.gateway().find_connection(workspace, provider))
            .await
            .map(|id| Arc::<str>::from(id.as_str()));
        // A gateway that could not be reached is asked again next time.
        if !matches!(found, Err(ref e) if e.is_retryable()) {
            self.lock()
                .insert(route.name.clone(), (found.clone(), Instant::now()));
        }
        found
    }

    /// Forgets the lookup of `route`: the connection it found is gone.
    pub fn forget(&self, route: &str) {
        self.lock().remove(route);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Found>> {
        // Whole values only; a panic elsewhere cannot leave half an entry.
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }
}
