//! Cost of applying a strategy to one request (SPEC §11: header strategy
//! < 1 µs, SigV4 signing < 20 µs per request).
//!
//! `cargo bench -p nexus-bridge --bench strategies`
//!
//! Each figure is the median of 15 batches, each timing a batch of
//! applications to a prepared request (the request is rebuilt outside the
//! timed part only where the strategy cannot overwrite its own output).

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use nexus_bridge::strategy::apply_http;
use nexus_bridge::{Credentials, Secret, Strategy};
use serde_json::json;

fn creds(kind: &str, config: serde_json::Value, secrets: &[(&str, &str)]) -> Credentials {
    Credentials::new(
        Strategy {
            kind: kind.into(),
            config: config.as_object().cloned().unwrap_or_default(),
        },
        secrets
            .iter()
            .map(|(k, v)| (k.to_string(), Secret::new(*v)))
            .collect::<HashMap<_, _>>(),
    )
}

fn request(body: &[u8]) -> http::Request<Vec<u8>> {
    http::Request::builder()
        .method("POST")
        .uri("https://api.example.com/v1/items?limit=10&cursor=abc")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(body.to_vec())
        .expect("request")
}

/// Median time per application over 15 batches of `n`.
fn measure(n: u32, mut once: impl FnMut()) -> Duration {
    for _ in 0..n {
        once();
    }
    let mut batches: Vec<Duration> = (0..15)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                once();
            }
            start.elapsed() / n
        })
        .collect();
    batches.sort();
    batches[batches.len() / 2]
}

fn main() {
    let body = br#"{"name":"widget","count":3,"tags":["a","b","c"]}"#;
    let rows: Vec<(&str, Credentials, u32, f64)> = vec![
        (
            "header",
            creds(
                "header",
                json!({"header_name": "X-Api-Key", "credential_field": "api_key"}),
                &[("api_key", "sk_live_0123456789abcdef0123456789abcdef")],
            ),
            200_000,
            1.0,
        ),
        (
            "oauth2",
            creds("oauth2", json!({}), &[("access_token", &"a".repeat(900))]),
            200_000,
            1.0,
        ),
        (
            "aws_sigv4",
            creds(
                "aws_sigv4",
                json!({"region": "us-east-1", "service": "execute-api"}),
                &[
                    ("access_key", "AKIDEXAMPLE"),
                    ("secret_key", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
                ],
            ),
            20_000,
            20.0,
        ),
        (
            "aws_sigv4+token",
            creds(
                "aws_sigv4",
                json!({"region": "us-east-1", "service": "execute-api"}),
                &[
                    ("access_key", "AKIDEXAMPLE"),
                    ("secret_key", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
                    ("session_token", &"t".repeat(400)),
                ],
            ),
            20_000,
            20.0,
        ),
    ];
    println!("{:<18} {:>12}  target", "strategy", "per request");
    for (name, c, n, target_us) in rows {
        let mut req = request(body);
        let per = measure(n, || {
            apply_http(black_box(&c), black_box(&mut req)).expect("applied");
        });
        let us = per.as_secs_f64() * 1e6;
        println!(
            "{name:<18} {:>9.3} µs  < {target_us} µs {}",
            us,
            if us < target_us { "met" } else { "NOT MET" }
        );
    }
}
