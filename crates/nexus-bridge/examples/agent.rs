//! An agent calling a provider API through the bridge.
//!
//! ```sh
//! nexus up                                   # gateway on 127.0.0.1:8090, AGENT_KEY in .nexus/nexus.env
//! export GATEWAY_URL=http://127.0.0.1:8090 AGENT_KEY=nxa_... CONNECTION_ID=...
//! cargo run -p nexus-bridge --example agent -- https://api.example.com/v1/me
//! ```
//!
//! Without CONNECTION_ID it starts a connection for USER_ID (default `demo`)
//! with PROVIDER (default `google`), prints the consent URL and waits for it.

use std::time::Duration;

use nexus_bridge::{Bridge, BridgeError, ConnectionRequest};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str, default: &str| std::env::var(k).unwrap_or_else(|_| default.to_string());
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: agent <provider API URL>")?;
    let bridge = Bridge::builder(
        env("GATEWAY_URL", "http://127.0.0.1:8090"),
        std::env::var("AGENT_KEY")?,
    )
    .build()?;

    let connection = match std::env::var("CONNECTION_ID") {
        Ok(id) => id,
        Err(_) => {
            let spec = bridge
                .request_connection(&ConnectionRequest {
                    user_id: env("USER_ID", "demo"),
                    provider_name: Some(env("PROVIDER", "google")),
                    return_url: env("RETURN_URL", "http://localhost:3000/done"),
                    ..Default::default()
                })
                .await?;
            println!("Open this URL to connect the account:\n  {}", spec.auth_url);
            bridge
                .wait_for_active(&spec.connection_id, Duration::from_secs(600))
                .await?;
            println!("connection {} is active", spec.connection_id);
            spec.connection_id
        }
    };

    let api = bridge.agent_client(&connection).build()?;
    for _ in 0..3 {
        match api.get(&url).send().await {
            Ok(resp) => println!("{} {}", resp.status(), resp.text().await?),
            Err(e) => match BridgeError::of(&e) {
                Some(BridgeError::InteractionRequired { message, .. }) => {
                    eprintln!("a person must reconnect this account: {message}");
                    return Ok(());
                }
                _ => return Err(e.into()),
            },
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(())
}
