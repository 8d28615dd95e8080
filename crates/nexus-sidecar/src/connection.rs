//! Which connection a route uses: its id, or the workspace's connection to
//! a provider, looked up through the gateway and kept for a minute (a
//! reconnect that made a new connection is picked up by the next lookup).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nexus_bridge::{Bridge, BridgeError};

use crate::routes::{ConnectionRef, Route};

/// How long a looked-up connection is kept.
pub const LOOKUP_TTL: Duration = Duration::from_secs(60);

/// Looked-up connections by route.
#[derive(Debug, Default)]
pub struct Resolver {
    found: Mutex<HashMap<String, (Arc<str>, Instant)>>,
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
        if let Some((id, at)) = self.lock().get(&route.name) {
            if at.elapsed() < LOOKUP_TTL {
                return Ok(id.clone());
            }
        }
        let id: Arc<str> = Arc::from(
            bridge
                .gateway()
                .find_connection(workspace, provider)
                .await?,
        );
        self.lock()
            .insert(route.name.clone(), (id.clone(), Instant::now()));
        Ok(id)
    }

    /// Forgets the lookup of `route` (its connection stopped serving).
    pub fn forget(&self, route: &str) {
        self.lock().remove(route);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<str>, Instant)>> {
        // Whole values only; a panic elsewhere cannot leave half an entry.
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }
}
